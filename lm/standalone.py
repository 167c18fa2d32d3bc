"""Train without Ray, on a box launched by `torchrun` or `deepspeed` (one process per device):

    torchrun --nproc_per_node=8 -m lm.standalone --config run_config.json --dataset-dir <token cache>

`--config` is a resolved config (a checkpoint's or summary's `config`); checkpoints go to
<run.storage>/<run.name>/checkpoint_<step>, written to a partial directory and renamed into place
by rank 0 once every rank has written its part. Rerunning resumes from the latest one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from lm.checkpoint import (check_resumable, commit_checkpoint_dir, damaged_file, find_latest_checkpoint, load_config,
                           remove_checkpoint)


def local_hooks(run_dir: str | Path, rank: int, keep: int, log=None):
    """TrainHooks that write checkpoints to a filesystem every rank shares."""
    from lm.trainer import TrainHooks

    run_dir = Path(run_dir)

    def checkpoint_dir(step: int) -> str:
        return str(run_dir / f".checkpoint_{step:06d}.partial")

    def commit_checkpoint(step: int, path: str, metrics: dict) -> None:
        if rank != 0:
            return
        final = run_dir / f"checkpoint_{step:06d}"
        remove_checkpoint(final)
        commit_checkpoint_dir(path, final)
        complete = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
        for old in complete[:-keep]:
            remove_checkpoint(old)

    latest = find_latest_checkpoint(run_dir)
    return TrainHooks(log=log or _print_metrics, checkpoint_dir=checkpoint_dir,
                      commit_checkpoint=commit_checkpoint, resume_from=str(latest) if latest else None,
                      run_dir=str(run_dir))


def format_metrics(metrics: dict, step: int) -> str:
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    return f"[step {step}] {shown}"


def _print_metrics(metrics: dict, step: int) -> None:
    print(format_metrics(metrics, step), flush=True)


def resumable_checkpoint(cfg, run_dir: Path) -> Path | None:
    """The run's latest checkpoint, after `check_resumable` (the Ray driver's checks)."""
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        check_resumable(cfg, latest.name, load_config(latest), lambda: damaged_file(latest),
                        lambda name="": str(run_dir / name) if name else str(run_dir))
    return latest


def main() -> None:
    from lm.config import ConfigError, config_from_dict, validate
    from lm.run_lock import training_lock
    from lm.trainer import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config JSON")
    parser.add_argument("--dataset-dir", required=True, help="token cache directory (has meta.json)")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = config_from_dict(json.loads(Path(args.config).read_text()))
        validate(cfg)
        cfg.cluster.num_workers = int(os.environ.get("WORLD_SIZE", cfg.cluster.num_workers))
        run_dir = Path(cfg.run.storage) / cfg.run.name
        resumable_checkpoint(cfg, run_dir)  # every rank checks, so every rank stops on a bad one
        # rank 0 commits the checkpoints, so it holds the run: a second launch of it stops here
        with training_lock(str(run_dir), cfg.run.name) if rank == 0 else contextlib.nullcontext():
            metrics = train(cfg, args.dataset_dir, local_hooks(run_dir, rank, cfg.trainer.keep_checkpoints))
    except ConfigError as error:
        if rank == 0:
            print(f"config error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank == 0:
        print(json.dumps(metrics, indent=2))
    import torch.distributed as dist

    dist.destroy_process_group()  # train() ends with a barrier; the group goes before the interpreter does


if __name__ == "__main__":
    main()
