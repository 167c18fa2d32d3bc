"""Linear layers for decoding.

- `DecodeLinear`: the fp32/bf16 weight stored transposed, (in, out) and contiguous. Decoding
  multiplies a few rows (one per running sequence) by each weight; on CPU, MKL's GEMM is 2-7x
  faster for 8-16 rows in this layout than in nn.Linear's (out, in) layout (benchmarks/RESULTS.md).
  Hugging Face GPT-2's Conv1D uses the same layout. Same function, so the swap is made in place.
- `Int8Linear`: an int8 export's weights (per-output-channel scales) with two kernels. Eager:
  PyTorch's dynamic quantized linear (FBGEMM int8 GEMM, activations quantized per tensor on each
  call), the fastest eager path here at every batch size. Compiled (the engine's `compile` mode),
  by what the CPU has (`COMPILED_INT8_KERNEL`): with VNNI (AVX-512 VNNI, AMX machines), each row's
  activations quantized to int8 (symmetric, per row) and `torch._int_mm` (int8 x int8 -> int32) on
  the stored (out, in) weight seen transposed; the quantization fuses into the program's neighbouring
  kernels, and the GEMM is 2-4x faster than weight-only int8 at 1-8 rows there. Without VNNI (AVX2
  only: AMD Zen 3, older Xeons) `_int_mm` falls back to a path 4-7x slower than fp32, and weight-only
  int8 with bf16 activations (`torch._weight_int8pack_mm`) is the fast one: 1.45x fp32 at one row,
  2.1x at eight (benchmarks/int8_kernels.py, RESULTS.md). FBGEMM's packed weights are a TorchScript
  object that a compiled program cannot hold. Either way a quarter of fp32's weight bytes per token,
  which is what small-batch decoding on a CPU is bound by.
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


INT8_KERNELS = ("int_mm", "weight_only_bf16")
_has_vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: True)  # (a private probe: absent, assume VNNI)
COMPILED_INT8_KERNEL = "int_mm" if _has_vnni() else "weight_only_bf16"


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None])^T + b, q int8 (out, in). See the module docstring for the kernels;
    `int8_activations = True` runs the compiled path's arithmetic in eager too (the export gate measures
    it), with `kernel` one of INT8_KERNELS (the export gate measures each: the serving CPU may differ)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("scale_bf16", self.scale.bfloat16(), persistent=False)
        self.dynamic = _fbgemm_linear(q, scale, self.bias)
        self.int8_activations = False
        self.kernel = COMPILED_INT8_KERNEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.int8_activations or torch.compiler.is_compiling()):
            return self.dynamic(x)
        rows = x.reshape(-1, self.in_features).float()
        if self.kernel == "weight_only_bf16":
            y = torch._weight_int8pack_mm(rows.bfloat16(), self.weight_int8, self.scale_bf16).float()
        else:
            row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
            q_rows = torch.round(rows / row_scale).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(q_rows, self.weight_int8.t()).float() * (row_scale * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def use_int8_activations(model: nn.Module, on: bool = True, kernel: str = COMPILED_INT8_KERNEL) -> None:
    """Make every Int8Linear of the model run a compiled path's arithmetic in eager (or go back to FBGEMM)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.int8_activations, module.kernel = on, kernel


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
