"""Per-call time of each CPU matmul kernel PyTorch offers for the decode shapes, at 1 and 8 rows.

    .venv/bin/python benchmarks/int8_kernels.py [--threads 2]

Why it exists: int8 decoding (lm/inference.py) reads a quarter of fp32's weight bytes, but how much
of that becomes speed depends on the kernel (this chose `_int_mm` for the compiled engine). Each
kernel runs on the same weights (the model's four block matrices and its output head, 6 layers x 384
wide, vocab 8192), called back to back, so the weights sit in cache and what remains is each call's
own cost.
Kernels: fp32 GEMM on (in, out) weights (what the engine uses), torch's dynamic quantized linear
on each quantized engine (FBGEMM, oneDNN, x86; what int8 exports use in eager), `torch._int_mm` (int8 x
int8 -> int32, activations already quantized; on an (in, out) copy, and on the stored (out, in) weight
seen transposed, which the compiled engine uses), `torch._weight_int8pack_mm` (weight-only int8), bf16 GEMM.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from lm.inference import Int8Linear

from report import write_report  # benchmarks/ (run as a script)

SHAPES = {"attn qkv": (384, 1152), "attn proj": (384, 384), "mlp fc": (384, 1536), "mlp proj": (1536, 384),
          "head": (384, 8192)}


def per_call_us(fn, calls: int = 200, repeats: int = 3) -> float:
    """Median over repeats of the mean time of `calls` back-to-back calls, in microseconds."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def kernels(in_features: int, out_features: int, rows: int) -> dict:
    """name -> a zero-argument call computing x @ W^T for one shape (same weights, quantized as exported)."""
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features) * 0.02
    x = torch.randn(rows, in_features)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    w_t, q_t = w.t().contiguous(), q.t().contiguous()
    x_q = torch.round(x / (x.abs().amax(dim=1, keepdim=True) / 127)).to(torch.int8)
    x_bf16, w_t_bf16 = x.bfloat16(), w_t.bfloat16()
    calls = {"fp32 GEMM": lambda: x @ w_t}
    for engine in ("fbgemm", "onednn", "x86"):
        if engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = engine
            layer = Int8Linear(q, scale, torch.zeros(out_features)).dynamic  # FBGEMM-packed for this engine

            def call(layer=layer, engine=engine):
                torch.backends.quantized.engine = engine
                return layer(x)
            calls[f"dynamic int8 ({engine})"] = call
    calls["_int_mm int8 (in, out)"] = lambda: torch._int_mm(x_q, q_t)
    calls["_int_mm int8 q.t()"] = lambda: torch._int_mm(x_q, q.t())  # the compiled engine's: stored (out, in)
    calls["_weight_int8pack_mm"] = lambda: torch._weight_int8pack_mm(x, q, scale)
    scale_bf16 = scale.bfloat16()  # bf16 activations take its AVX-512 path (the compiled engine's, before _int_mm)
    calls["_weight_int8pack_mm bf16 x"] = lambda: torch._weight_int8pack_mm(x_bf16, q, scale_bf16)
    calls["bf16 GEMM"] = lambda: x_bf16 @ w_t_bf16
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao

    results = []
    for rows in (1, 8):
        for shape_name, (fan_in, fan_out) in SHAPES.items():
            for kernel, call in kernels(fan_in, fan_out, rows).items():
                try:
                    us = per_call_us(call, calls=50 if "int8pack" in kernel else 200)
                except RuntimeError as error:  # a kernel this build lacks
                    us = float("nan")
                    print(f"{kernel} at {shape_name}: {error}")
                results.append({"rows": rows, "shape": shape_name, "in": fan_in, "out": fan_out,
                                "kernel": kernel, "us_per_call": us})

    names = list(dict.fromkeys(r["kernel"] for r in results))
    print(f"\nmicroseconds per call, {args.threads} threads; per token = 6 x (4 block matrices) + head")
    for rows in (1, 8):
        print(f"\nrows={rows:<3} " + "".join(f"{s:>11}" for s in SHAPES) + f"{'per token':>11}{'vs fp32':>9}")
        fp32_total = None
        for name in names:
            us = {r["shape"]: r["us_per_call"] for r in results if r["rows"] == rows and r["kernel"] == name}
            total = 6 * sum(us[s] for s in SHAPES if s != "head") + us["head"]
            fp32_total = fp32_total or total
            print(f"{name:<28}"[:28] + "".join(f"{us[s]:>11.1f}" for s in SHAPES)
                  + f"{total:>11.0f}{fp32_total / total:>8.2f}x")
    write_report(args.out, {"threads": args.threads, "results": results})


if __name__ == "__main__":
    main()
