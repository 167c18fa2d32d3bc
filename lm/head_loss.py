"""The output head and its cross-entropy in one pass, a chunk of tokens at a time.

A (tokens, vocab) logits matrix is the largest tensor of a small model's step (2,048 tokens x 8,192
vocab = 64 MB in fp32), and plain cross-entropy walks it about six times: log-softmax, a zero-filled
gradient, the scatter, log-softmax's backward. Here each chunk's logits are made, turned into the
loss and into their gradient (softmax minus one-hot) in place, and multiplied into the gradients of
the hidden states and of the head right away, while they are still in cache; the logits never exist
whole. Backward only scales the stored gradients. The same idea as Liger Kernel's fused linear
cross-entropy, in plain torch ops. RESULTS.md has the numbers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

IGNORE_INDEX = -100

# Logits per chunk: cache-sized on a CPU; on a GPU big enough that each matmul fills the device.
_CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**25}


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX targets are not
    counted; with none counted the loss is 0). Gradients are computed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(dtype)
        counted = targets != IGNORE_INDEX
        per_target = counted / counted.sum().clamp(min=1)  # each counted target's share of the mean
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, _CHUNK_ELEMENTS.get(device, 2**25) // weight.shape[0])
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h, share = hidden[start:start + rows].to(dtype), per_target[start:start + rows]
                picks = targets[start:start + rows].clamp(min=0)[:, None]
                logits = (h @ w.t()).float()
                target_logit = logits.gather(1, picks)[:, 0]
                top = logits.amax(-1, keepdim=True)
                probs = logits.sub_(top).exp_()  # in place: the chunk's logits become its gradient
                total = probs.sum(-1)
                loss += ((total.log() + top[:, 0] - target_logit) * share).sum()
                grad = probs.mul_((share / total)[:, None]).scatter_add_(1, picks, -share[:, None]).to(dtype)
                grad_hidden[start:start + rows] = grad @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:  # a bf16 matmul, its chunks summed in fp32
                    grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None


class OutputHead(nn.Linear):
    """The vocabulary projection (no bias). `head(x)` gives logits; `head(x, targets)` gives the mean
    cross-entropy through LinearCrossEntropy, without the logits. It is a module call either way, so
    ZeRO-3 gathers the weight for it."""

    def __init__(self, n_embd: int, vocab_size: int):
        super().__init__(n_embd, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), self.weight, targets.reshape(-1))
