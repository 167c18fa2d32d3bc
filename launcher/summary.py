"""`<run.storage>/<run.name>/summary.json`: the run's outcome in one file, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lm.checkpoint import TRAINER_STATE

SUMMARY_KEYS = ("train_loss", "val_loss", "val_perplexity", "val_accuracy", "steps", "tokens",
                "tokens_per_second", "mfu", "wall_seconds", "vocab_size", "checkpoint", "wandb_dir",
                "config")


def build_summary(checkpoint: Path, wall_seconds: float, vocab_size: int, wandb_dir: str | None,
                  config: dict) -> dict:
    """From the latest checkpoint's trainer state, which every rank agreed on before it was saved."""
    metrics = json.loads((checkpoint / TRAINER_STATE).read_text())["metrics"]
    summary = {key: metrics.get(key) for key in SUMMARY_KEYS}
    summary.update(peak_flops_source=metrics.get("peak_flops_source"), precision=metrics.get("precision"),
                   wall_seconds=wall_seconds, vocab_size=vocab_size, checkpoint=str(checkpoint),
                   wandb_dir=wandb_dir, config=config)
    return summary


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return path


def previous_wandb_dir(run_dir: Path) -> str | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("wandb_dir") if path.exists() else None
