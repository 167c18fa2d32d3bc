"""Hydra multirun: collect each job's summary and print overrides -> final val loss at the end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        overrides = " ".join(job_return.overrides or [])
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            summary = job_return.return_value
            self.rows.append({"overrides": overrides, "run": summary["config"]["run"]["name"],
                              "val_loss": summary["val_loss"], "status": "ok"})
        else:
            self.rows.append({"overrides": overrides, "run": None, "val_loss": None, "status": "failed"})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.rows:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(self.rows, indent=2))
        with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        print(format_table(self.rows), flush=True)
        print(f"sweep summary: {sweep_dir / 'sweep_summary.json'}", flush=True)


def format_table(rows: list[dict]) -> str:
    """One line per job: the overrides that vary across the sweep, its final val loss, its run."""
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    varying = [" ".join(o for o in r["overrides"].split() if o not in common) for r in rows]
    width = max(len("overrides"), *(len(v) for v in varying))
    lines = [f"{'overrides':<{width}}  {'final val_loss':>14}  run", "-" * (width + 40)]
    for r, shown in zip(rows, varying):
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else r["status"]
        lines.append(f"{shown:<{width}}  {loss:>14}  {r['run'] or ''}")
    return "\n".join(lines)
