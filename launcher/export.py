"""Export a training run's checkpoint for serving:

    python -m launcher.export run.name=<run> export.precision=int8     # or bf16, fp32

Any ZeRO stage and number of ranks; the perplexity check uses the run's own validation split.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launcher.run_dir import RunDir, is_uri
from launcher.schema import absolute, check_command_line, fail
from launcher.storage import check_object_store
from lm.config import ConfigError, ExportAppConfig, RunConfig, sequence_length

ConfigStore.instance().store(name="export_schema", node=ExportAppConfig)


def resolve_run_dir(run: RunConfig) -> RunDir:
    """The named run, or the most recently trained one under run.storage (a path or a URI)."""
    storage = absolute(run.storage)
    if is_uri(storage):
        check_object_store(storage)
    if run.name:
        run_dir = RunDir(storage, run.name)
        if not run_dir.exists():
            raise ConfigError(f"run.name={run.name!r} has no run directory under run.storage={storage!r}")
        return run_dir
    runs = [RunDir(storage, name) for name in RunDir(storage, "").listdir()]
    if is_uri(storage):  # an object store's "directories" have no times: the newest summary's run
        trained = [(r.mtime("summary.json"), r) for r in runs if r.exists("summary.json")]
    else:
        trained = [(os.stat(r.path).st_mtime, r) for r in runs if os.path.isdir(r.path)]
    if not trained:
        raise ConfigError(f"run.name=null: there are no runs under run.storage={storage!r}; train one first")
    return max(trained, key=lambda pair: pair[0])[1]


def export_run(cfg: ExportAppConfig) -> str:
    if not torch_has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lm.checkpoint import is_complete
    from lm.export import PRECISIONS

    e = cfg.export
    if e.precision not in PRECISIONS:
        raise ConfigError(f"export.precision={e.precision!r} is invalid: allowed values are {', '.join(PRECISIONS)}")
    if not e.max_ppl_increase >= 0:  # NaN too, which would pass every gate
        raise ConfigError(f"export.max_ppl_increase={e.max_ppl_increase} is invalid: must be a number >= 0")
    if e.eval_batches < 1:
        raise ConfigError(f"export.eval_batches={e.eval_batches} is invalid: must be an integer >= 1")
    run_dir = resolve_run_dir(cfg.run)
    with tempfile.TemporaryDirectory(prefix="lmstack-export-") as scratch:  # used for an object store only
        if e.checkpoint:
            checkpoint = Path(e.checkpoint)
        else:
            latest = run_dir.latest_checkpoint()
            checkpoint = run_dir.local_copy(latest, Path(scratch) / "checkpoint") if latest else None
        if checkpoint is None or not is_complete(checkpoint):
            raise ConfigError(f"export.checkpoint={str(checkpoint or run_dir.where())!r}: no complete training "
                              "checkpoint there")
        return _export(cfg, run_dir, checkpoint, Path(scratch) / "export")


def _export(cfg: ExportAppConfig, run_dir: RunDir, checkpoint: Path, scratch: Path) -> str:
    from lm.checkpoint import checkpoint_step, load_config
    from lm.data import prepare_data
    from lm.export import EXPORT_FILES, ExportQualityError, export_checkpoint
    from lm.tokenizer import load_tokenizer

    e = cfg.export
    try:
        train_cfg = load_config(checkpoint)
        step = checkpoint_step(checkpoint)
    except Exception as error:  # a damaged file: say which, write nothing
        raise ConfigError(f"export.checkpoint={str(checkpoint)!r} is corrupt: {type(error).__name__}: {error}") from None
    # A fine-tune's data was encoded with the pretrained model's tokenizer, which its checkpoint holds.
    given = load_tokenizer(checkpoint / "tokenizer.json") if train_cfg.trainer.init_from else None
    val_tokens = prepare_data(train_cfg.data, progress=False, tokenizer=given,
                              seq_len=sequence_length(train_cfg)).tokens("val")
    name = f"exports/{e.precision}-step{step:06d}"
    out_dir = scratch if run_dir.remote else Path(run_dir.path) / name
    try:
        report = export_checkpoint(checkpoint, out_dir, e.precision, val_tokens, e.max_ppl_increase, e.force,
                                   e.eval_batches)
    except ExportQualityError as error:
        raise ConfigError(str(error)) from None
    except (RuntimeError, KeyError, OSError, ValueError) as error:
        raise ConfigError(f"export.checkpoint={str(checkpoint)!r} is corrupt: {type(error).__name__}: {error}") from None
    if run_dir.remote:  # written here, then uploaded with the file that marks it complete last
        run_dir.upload(out_dir, name, last=EXPORT_FILES[-1:])
    print(f"export: {run_dir.where(name)}\nprecision={e.precision} val_perplexity "
          f"{report['val_perplexity_fp32']:.3f} (fp32) -> "
          f"{report['val_perplexity']:.3f} ({report['ppl_increase']:+.2%})", flush=True)
    return run_dir.where(name)


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
    check_command_line(ExportAppConfig)
    main()
