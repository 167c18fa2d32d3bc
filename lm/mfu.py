"""Model FLOPs utilization: achieved training FLOP/s over the device's peak.

The peak comes from a per-device table for known GPUs (dense, no sparsity, with the precision
that the matmuls actually run in), and otherwise, on CPUs and unknown GPUs, from a matmul measured
once in this process with the same thread count and dtype. `PeakFlops.source` says which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense peak FLOP/s per device by matmul precision (vendor datasheets; SXM parts).
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


@dataclass(frozen=True)
class PeakFlops:
    flops: float  # per device (per worker)
    source: str  # how the number was obtained, for logs and summaries


def _matmul_precision(precision: str) -> str:
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Without, torch emulates bf16,
    which then trains slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a CPU with AVX-512 BF16 or AMX, a GPU with bf16."""
    if device.type == "cpu":
        return cpu_has_bf16()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def peak_matmul_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype whose matmul peak a run in `precision` is held against: bf16's where the device
    multiplies bf16 natively, else fp32's. A CPU without bf16 instructions emulates bf16 matmuls slower
    than fp32 ones, so against its bf16 peak, bf16 training there would look efficient while running slow.
    fp16 runs on GPUs only (lm.config.validate), against their fp16 peak."""
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if precision == "bf16" and native_bf16(device) else torch.float32


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """Best observed FLOP/s of a square matmul: an honest ceiling for this process's threads."""
    gen = torch.Generator(device=device).manual_seed(0)  # never the global RNG: resume must stay exact
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str) -> PeakFlops:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        matmul = _matmul_precision(precision)
        for key, table in GPU_PEAK_FLOPS.items():
            if key in name and not ("H100" in key and "PCIe" in name):
                return PeakFlops(table[matmul], f"table: {name}, dense {matmul}")
    dtype = peak_matmul_dtype(device, precision)
    measured = measure_matmul_flops(device, dtype)
    threads = torch.get_num_threads()
    note = ""
    if precision == "bf16" and dtype != torch.bfloat16:
        note = " (this CPU has no native bf16)" if device.type == "cpu" else " (this device has no native bf16)"
    return PeakFlops(measured, f"measured: 1024x1024 {dtype} matmul on {device.type}, {threads} threads{note}")


def mfu(flops_per_token: float, tokens_per_second: float, peak: PeakFlops, num_devices: int) -> float:
    return flops_per_token * tokens_per_second / (peak.flops * num_devices)
