"""Weights & Biases from rank 0 of a worker group: offline by default, online when asked."""

from __future__ import annotations

import os
from pathlib import Path

from lm.config import LoggingConfig


class WandbLogger:
    def __init__(self, cfg: LoggingConfig, run_name: str, group: str | None, config: dict):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=group or cfg.group,
                              name=run_name, dir=cfg.dir, mode=cfg.mode, config=config,
                              job_type="train", reinit="finish_previous",
                              # Ray already forwards worker stdout; W&B's capture would echo it twice.
                              settings=wandb.Settings(console="off"))

    @property
    def run_dir(self) -> str:
        """The run's own directory (…/wandb/offline-run-<time>-<id>), what `wandb sync` takes."""
        return str(Path(self.run.dir).parent)

    def update_config(self, config: dict) -> None:
        """The run's config as the workers run it (`trainer.precision=auto` resolved)."""
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self) -> None:
        self.run.finish()
