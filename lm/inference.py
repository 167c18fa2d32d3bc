"""Linear layers for decoding.

- `DecodeLinear`: the fp32/bf16 weight stored transposed, (in, out) and contiguous. Decoding
  multiplies a few rows (one per running sequence) by each weight; on CPU, MKL's GEMM is 2-7x
  faster for 8-16 rows in this layout than in nn.Linear's (out, in) layout (benchmarks/RESULTS.md).
  Hugging Face GPT-2's Conv1D uses the same layout. Same function, so the swap is made in place.
- `Int8Linear`: an int8 export's weights (per-output-channel scales) with two kernels. Eager:
  PyTorch's dynamic quantized linear (FBGEMM int8 GEMM, activations quantized per call), the
  fastest eager path here at every batch size. Compiled (the engine's `compile` mode):
  `torch._weight_int8pack_mm`, weight-only int8 with bf16 activations, an AVX-512 GEMV that a
  compiled program can hold (FBGEMM's packed weights are a TorchScript object it cannot). Either
  way a quarter of fp32's weight bytes per token, which is what small-batch decoding on a CPU is
  bound by.
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


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None])^T + b, q int8 (out, in). See the module docstring for the kernels;
    `weight_only = True` runs the compiled path's kernel in eager too (the export gate measures both)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.dynamic = _fbgemm_linear(q, scale, self.bias)
        self.weight_only = False
        # The weight-only kernel needs in_features % 16 == 0 (other widths crash or miscompute).
        self.kernel_fits = self.in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.weight_only or torch.compiler.is_compiling()):
            return self.dynamic(x)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        # The kernel is a GEMV (its time grows with every row); where it does not fit or pay, the same
        # arithmetic goes through an fp32 GEMM.
        if self.kernel_fits and (torch.compiler.is_compiling() or rows.shape[0] <= 16):
            y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scale_bf16)
        else:
            weight = self.weight_int8.float() * self.scale_bf16.float()[:, None]
            y = (rows.float() @ weight.t()).to(torch.bfloat16)
        y = y.to(x.dtype) if self.bias is None else y.to(x.dtype) + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def use_weight_only_int8(model: nn.Module, on: bool = True) -> None:
    """Make every Int8Linear of the model run the weight-only kernel in eager (or go back to FBGEMM)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.weight_only = on


def _fbgemm_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """PyTorch's dynamic-quantized linear computing with these int8 weights."""
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        out_features, in_features = q.shape
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0)
        layer = DynamicQuantizedLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, bias)
    return layer
