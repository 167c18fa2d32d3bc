"""Linear layers for decoding.

- `DecodeLinear`: the fp32/bf16 weight stored transposed, (in, out) and contiguous. Decoding
  multiplies a few rows (one per running sequence) by each weight; on CPU, MKL's GEMM is 2-7x
  faster for 8-16 rows in this layout than in nn.Linear's (out, in) layout (benchmarks/RESULTS.md).
  Hugging Face GPT-2's Conv1D uses the same layout. Same function, so the swap is made in place.
- `int8_linear`: an int8 export's weights (per-output-channel scales) run by PyTorch's dynamic
  quantized linear (FBGEMM int8 GEMM, activations quantized per call): a quarter of the weight
  bytes per token, which is what batch-1 decoding on a CPU is bound by.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DecodeLinear(nn.Module):
    """y = x @ W^T + b with W^T stored contiguously."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = rows @ self.weight_t if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)


def optimize_for_decoding(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear (the tied output head included) for a DecodeLinear, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, DecodeLinear(child))
    return model.eval()


def int8_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dynamic-quantized linear computing with these int8 weights (q ~ weight / scale[:, None])."""
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        out_features, in_features = q.shape
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0)
        layer = DynamicQuantizedLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, None if bias is None else bias.float())
    return layer
