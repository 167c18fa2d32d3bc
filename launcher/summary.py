"""`<run.storage>/<run.name>/summary.json`: the run's outcome in one file, written atomically."""

from __future__ import annotations

import json

from launcher.run_dir import RunDir

SUMMARY_KEYS = ("train_loss", "val_loss", "val_perplexity", "val_accuracy", "steps", "tokens",
                "tokens_per_second", "mfu", "wall_seconds", "vocab_size", "checkpoint", "wandb_dir",
                "wandb_copy", "config")


def build_summary(run_dir: RunDir, checkpoint: str, wall_seconds: float, vocab_size: int,
                  wandb_dir: str | None, config: dict, wandb_copy: str | None = None) -> dict:
    """From the latest checkpoint's trainer state, which every rank agreed on before it was saved.
    `wandb_dir`: the W&B run's directory on rank 0's node; `wandb_copy`: its copy in the run's storage."""
    metrics = run_dir.trainer_state(checkpoint)["metrics"]
    summary = {key: metrics.get(key) for key in SUMMARY_KEYS}
    summary.update(peak_flops_source=metrics.get("peak_flops_source"), precision=metrics.get("precision"),
                   wall_seconds=wall_seconds, vocab_size=vocab_size, checkpoint=run_dir.where(checkpoint),
                   wandb_dir=wandb_dir, wandb_copy=wandb_copy, config=config)
    return summary


def write_summary(run_dir: RunDir, summary: dict) -> str:
    return run_dir.write_text("summary.json", json.dumps(summary, indent=2))


def previous_wandb_dir(run_dir: RunDir) -> str | None:
    return json.loads(run_dir.read_text("summary.json")).get("wandb_dir") if run_dir.exists("summary.json") else None
