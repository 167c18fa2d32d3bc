"""The JSON every benchmark writes: its own results plus where they came from (commit, date, torch,
machine), so a number in RESULTS.md can be traced to the run that produced it."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def write_report(out: Path, results: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    provenance = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, **provenance}, indent=2))
    print(f"\nJSON: {out}")
