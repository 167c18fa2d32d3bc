"""Export a training run's checkpoint for serving:

    python -m launcher.export run.name=<run> export.precision=int8     # or bf16, fp32

Any ZeRO stage and number of ranks; the perplexity check uses the run's own validation split.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launcher.schema import absolute, fail
from lm.config import ConfigError, ExportAppConfig, RunConfig, sequence_length

ConfigStore.instance().store(name="export_schema", node=ExportAppConfig)


def resolve_run_dir(run: RunConfig) -> Path:
    """The named run, or the most recently trained one under run.storage."""
    storage = Path(absolute(run.storage))
    if run.name:
        run_dir = storage / run.name
        if not run_dir.is_dir():
            raise ConfigError(f"run.name={run.name!r} has no run directory under run.storage={str(storage)!r}")
        return run_dir
    runs = [p for p in storage.glob("*") if p.is_dir()] if storage.is_dir() else []
    if not runs:
        raise ConfigError(f"run.name=null: there are no runs under run.storage={str(storage)!r}; train one first")
    return max(runs, key=lambda p: p.stat().st_mtime)


def export_run(cfg: ExportAppConfig) -> Path:
    if not torch_has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lm.checkpoint import checkpoint_step, find_latest_checkpoint, is_complete, load_config
    from lm.data import prepare_data
    from lm.export import PRECISIONS, ExportQualityError, export_checkpoint
    from lm.tokenizer import load_tokenizer

    e = cfg.export
    if e.precision not in PRECISIONS:
        raise ConfigError(f"export.precision={e.precision!r} is invalid: allowed values are {', '.join(PRECISIONS)}")
    if e.max_ppl_increase < 0:
        raise ConfigError(f"export.max_ppl_increase={e.max_ppl_increase} is invalid: must be >= 0")
    run_dir = resolve_run_dir(cfg.run)
    checkpoint = Path(e.checkpoint) if e.checkpoint else find_latest_checkpoint(run_dir)
    if checkpoint is None or not is_complete(checkpoint):
        raise ConfigError(f"export.checkpoint={str(checkpoint or run_dir)!r}: no complete training checkpoint there")
    try:
        train_cfg = load_config(checkpoint)
        step = checkpoint_step(checkpoint)
    except Exception as error:  # a damaged file: say which, write nothing
        raise ConfigError(f"export.checkpoint={str(checkpoint)!r} is corrupt: {type(error).__name__}: {error}") from None
    # A fine-tune's data was encoded with the pretrained model's tokenizer, which its checkpoint holds.
    given = load_tokenizer(checkpoint / "tokenizer.json") if train_cfg.trainer.init_from else None
    val_tokens = prepare_data(train_cfg.data, progress=False, tokenizer=given,
                              seq_len=sequence_length(train_cfg)).tokens("val")
    out_dir = run_dir / "exports" / f"{e.precision}-step{step:06d}"
    try:
        report = export_checkpoint(checkpoint, out_dir, e.precision, val_tokens, e.max_ppl_increase, e.force,
                                   e.eval_batches)
    except ExportQualityError as error:
        raise ConfigError(str(error)) from None
    except (RuntimeError, KeyError, OSError, ValueError) as error:
        raise ConfigError(f"export.checkpoint={str(checkpoint)!r} is corrupt: {type(error).__name__}: {error}") from None
    print(f"export: {out_dir}\nprecision={e.precision} val_perplexity {report['val_perplexity_fp32']:.3f} (fp32) -> "
          f"{report['val_perplexity']:.3f} ({report['ppl_increase']:+.2%})", flush=True)
    return out_dir


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@hydra.main(config_path="../hydra_conf", config_name="export", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        export_run(OmegaConf.to_object(dcfg))
    except ConfigError as error:
        fail(error)


if __name__ == "__main__":
    main()
