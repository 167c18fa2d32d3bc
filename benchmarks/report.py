"""What every benchmark shares: the JSON it writes (its own results plus where they came from: commit,
date, torch, machine), so a number in RESULTS.md can be traced to the run that produced it; and its
scratch directory."""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.exists() else []


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (Linux), e.g. avx512_bf16."""
    return set(next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), []))


def cpu_description() -> str:
    """The CPU's model name, cores and the instruction sets that decide these numbers: machines lent to
    different sessions differ (bf16 and int8 speed most of all)."""
    info = _cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                 platform.processor() or platform.machine())
    family = [line.split(":", 1)[1].strip() for line in info if line.startswith(("cpu family", "model\t"))][:2]
    if len(family) == 2:
        model += f" (family {family[0]}, model {family[1]})"
    flags = cpu_flags()
    present = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(present) or 'no AVX-512'}"


def write_report(out: Path, results: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    provenance = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "cpu": cpu_description()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, **provenance}, indent=2))
    print(f"\nJSON: {out}")


def scratch_dir(prefix: str) -> Path:
    """A temporary directory for a benchmark's corpora, runs and checkpoints (hundreds of MB), removed
    when the benchmark exits, however it exits short of being killed."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
