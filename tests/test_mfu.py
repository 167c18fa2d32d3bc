"""MFU: GPU peaks come from the table for the precision in use; CPU peaks are measured and say so."""

import pytest
import torch

import lm.mfu as mfu_module
from lm.mfu import GPU_PEAK_FLOPS, PeakFlops, mfu, peak_flops


def test_cpu_peak_is_measured_here_and_says_so():
    peak = peak_flops(torch.device("cpu"), "fp32")
    assert peak.flops > 1e8
    assert peak.source.startswith("measured: 1024x1024 torch.float32 matmul on cpu")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_peak_is_fp32_where_bf16_is_emulated(monkeypatch, native):
    """Without bf16 instructions torch emulates bf16 below fp32 speed: the hardware's peak is fp32's.
    (Measured on a 128-wide matmul: a 1024-wide one in emulated bf16 takes ~25 s on a CPU without it.)"""
    monkeypatch.setattr(mfu_module, "cpu_has_bf16", lambda: native)
    measured = []
    real = mfu_module.measure_matmul_flops
    monkeypatch.setattr(mfu_module, "measure_matmul_flops",
                        lambda device, dtype: measured.append(dtype) or real(device, dtype, size=128))
    peak = peak_flops(torch.device("cpu"), "bf16")
    dtype = torch.bfloat16 if native else torch.float32
    assert measured == [dtype] and peak.flops > 0
    assert peak.source.startswith(f"measured: 1024x1024 {dtype} matmul on cpu")
    assert peak.source.endswith("(this CPU has no native bf16)") != native


@pytest.mark.parametrize("name,precision,tf32,expected", [
    ("NVIDIA H200", "bf16", False, 989e12),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5e12),
    ("NVIDIA A100-SXM4-40GB", "bf16", False, 312e12),
])
def test_known_gpus_use_the_table_for_the_matmul_precision(monkeypatch, name, precision, tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    before = torch.backends.cuda.matmul.allow_tf32  # a dynamic attribute monkeypatch cannot restore
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        peak = peak_flops(torch.device("cuda", 0), precision)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert peak.flops == expected and peak.source.startswith(f"table: {name}")


def test_mfu_is_achieved_flops_over_the_peak_of_all_devices():
    assert mfu(1e9, 100.0, PeakFlops(1e12, "x"), num_devices=2) == pytest.approx(0.05)
    assert set(GPU_PEAK_FLOPS) == {"A100", "H100", "H200"}
    assert mfu_module.GPU_PEAK_FLOPS["H200"]["bf16"] > mfu_module.GPU_PEAK_FLOPS["H200"]["tf32"]
