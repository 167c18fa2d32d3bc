"""Training checkpoints: what every rank writes, how a run resumes, and how to read the weights back.

A checkpoint directory holds
    deepspeed/state/...   DeepSpeed's own files: model states and each rank's ZeRO shard
    deepspeed/state_universal/...  the same state in DeepSpeed's universal format, added by the first
                          resume on another number of ranks (it loads on any number)
    rng/rank_<r>.pt       each rank's torch / numpy / python RNG states
    trainer_state.json    step, data position, tokens seen, last metrics, what the hooks keep (the W&B
                          run id) (written by rank 0)
    config.json           the resolved config of the run
    tokenizer.json        the tokenizer, so the checkpoint is self-contained (and chat_template.json,
                          where the tokenizer carries a pretrained model's own chat template)
    parts/rank_<r>.json   each rank's manifest: every file of its part and its size
Every rank writes its own part into its own directory (node-local under Ray, which merges them
into one directory in storage; shared when the directories are the same).

torch is imported only by the functions that read or write tensors: the launcher's driver finds and
checks checkpoints before it starts Ray, and importing torch there (~1 s) would delay the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lm.config import TrainConfig, config_from_dict
from lm.staging import staged_directory
from lm.tokenizer import copy_tokenizer, load_tokenizer

if TYPE_CHECKING:
    import torch

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
UNIVERSAL_TAG = "state_universal"  # DeepSpeed's universal form of `state`, written on a resume that needs it
TRAINER_STATE = "trainer_state.json"
PARTS_DIR = "parts"


def save_rank_checkpoint(engine, path: str | Path, rank: int, trainer_state: dict,
                         config: dict, tokenizer_path: str | Path) -> None:
    """Every rank calls this (DeepSpeed's save is a collective)."""
    import torch

    path = Path(path)
    (path / DEEPSPEED_DIR).mkdir(parents=True, exist_ok=True)
    (path / "rng").mkdir(exist_ok=True)
    engine.save_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(rng, path / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        (path / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(tokenizer_path, path / "tokenizer.json")
        (path / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))


def write_part_manifest(path: str | Path, rank: int) -> None:
    """Record every file of this rank's part and its size, once every rank has finished writing
    (in a shared directory the listing then holds all parts; under Ray, this rank's own). Ray copies
    the parts into storage file by file, in any order: a file that is listed but missing or short
    there (a rank or node lost mid-copy) means the checkpoint is not one."""
    path = Path(path)
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.relative_to(path).parts[0] != PARTS_DIR}
    (path / PARTS_DIR).mkdir(exist_ok=True)
    partial = path / PARTS_DIR / f".rank_{rank}.json.partial"
    partial.write_text(json.dumps(files, indent=1))
    partial.rename(path / PARTS_DIR / f"rank_{rank}.json")


def needs_resharding(path: str | Path, world: int) -> bool:
    """Resuming on `world` ranks a checkpoint that another number of ranks wrote, whose optimizer state
    DeepSpeed partitioned by rank (ZeRO 1-3, and its bf16 optimizer at any stage): DeepSpeed loads
    such a state only on the same number of ranks, or from its universal format."""
    if load_config(path).cluster.num_workers == world:
        return False
    return any((Path(path) / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*optim_states.pt"))


def write_universal_checkpoint(path: str | Path) -> Path:
    """The checkpoint's DeepSpeed state in DeepSpeed's universal format (`ds_to_universal`: every
    parameter's fp32 weights and optimizer moments whole, unpartitioned), beside the original,
    which is left as it was. Written once, atomically; later calls find it."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_dir = Path(path) / DEEPSPEED_DIR
    final = ds_dir / UNIVERSAL_TAG
    if final.is_dir():
        return final
    with staged_directory(final) as staging:
        # inject_missing_state: the version record Megatron-DeepSpeed writes and our checkpoints do not.
        args = argparse.Namespace(input_folder=str(ds_dir / DEEPSPEED_TAG), output_folder=str(staging),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are diagnostics, not output
            ds_to_universal(args)
        (ds_dir / "latest_universal").unlink(missing_ok=True)  # it names the staging directory
    return final


def load_rank_checkpoint(engine, path: str | Path, rank: int, universal: bool = False) -> dict:
    """Restore weights, optimizer state and this rank's RNG; return the trainer state. `universal`:
    from the universal form (`needs_resharding`; the engine was made with load_universal); rank 0
    writes it while the others wait."""
    import torch
    import torch.distributed as dist

    path = Path(path)
    tag = DEEPSPEED_TAG
    if universal:
        if rank == 0:
            write_universal_checkpoint(path)
        dist.barrier()
        tag = UNIVERSAL_TAG
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    load_path, _ = engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag=tag,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if universal:
        _repair_universal_load(engine.optimizer, hyperparameters)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / DEEPSPEED_DIR}")
    rng_file = path / "rng" / f"rank_{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return read_trainer_state(path)


def _repair_universal_load(optimizer, hyperparameters: list[dict]) -> None:
    """Undo two things DeepSpeed 0.19's ZeRO-3 universal load gets wrong (found by resuming on another
    number of ranks and comparing with the uninterrupted run):
    - it gives every parameter group the first group's hyperparameters, so biases and norms get the
      matrices' weight decay: each group gets back its own, which the optimizer was built with;
    - it gives every group's state one shared step tensor, which torch's Adam then advances once per
      group each step (the wrong bias correction): each state gets its own copy."""
    import torch

    for group, kept in zip(optimizer.param_groups, hyperparameters):
        group.update(kept)
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO's wrapper holds torch's optimizer
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def is_complete(path: str | Path) -> bool:
    """A checkpoint counts once every rank's manifest is in it and every file each one lists is
    there at its full size (see `write_part_manifest`)."""
    path = Path(path)

    def size_of(name: str) -> int | None:
        try:
            return (path / name).stat().st_size
        except OSError:
            return None

    return manifest_complete(lambda name: (path / name).read_text(), size_of)


def manifest_complete(read_text, size_of) -> bool:
    """`is_complete` for a checkpoint read through `read_text(relative name) -> str` and
    `size_of(relative name) -> int | None` (None: missing): a directory, or one in an object store."""
    try:
        world = json.loads(read_text("config.json"))["cluster"]["num_workers"]
        for rank in range(world):
            listed = json.loads(read_text(f"{PARTS_DIR}/rank_{rank}.json"))
            if any(size_of(name) != size for name, size in listed.items()):
                return False
        json.loads(read_text(TRAINER_STATE))
    except (OSError, ValueError, KeyError, TypeError):  # missing, or still being copied
        return False
    return True


def damaged_file(path: str | Path) -> str | None:
    """The first of a checkpoint directory's torch files that cannot be read, with why (see
    `damaged_archive`), or None."""
    path = Path(path)
    names = [str(p.relative_to(path)) for p in path.rglob("*.pt")]
    return damaged_archive(names, lambda name: open(path / name, "rb"))


def damaged_archive(names, open_binary) -> str | None:
    """The first of a checkpoint's torch files (.pt, zip archives) among `names` whose archive
    directory cannot be read through `open_binary(name)`, with why: bytes a crash or a lost disk
    zeroed (or cut and padded) that the sizes in its manifests do not show. Reads only each archive's
    directory, not its tensors, so it is cheap enough to run before every resume."""
    import zipfile

    for name in sorted(names):
        if name.endswith(".pt"):
            try:
                with open_binary(name) as f, zipfile.ZipFile(f):
                    pass
            except (zipfile.BadZipFile, OSError, ValueError) as error:
                return f"{name} ({error})"
    return None


def check_resumable(cfg: TrainConfig, latest: str, saved: TrainConfig, damaged_file, where) -> None:
    """Refuse (ConfigError) to continue a run from its latest checkpoint, named `latest` in the run
    directory and written with config `saved`, when `cfg` cannot continue it, or when
    `damaged_file()` (`damaged_archive` of it) names a torch file that cannot be read. `where(name)`
    locates a name in the run directory, `where()` the directory: a path, or a URI in an object store."""
    from lm.config import ConfigError, resume_conflict

    conflict = resume_conflict(saved, cfg)
    if conflict:
        raise ConfigError(f"{conflict} (run.name={cfg.run.name!r} already has checkpoints at {where()}; "
                          "choose another run.name to start a new run)")
    damaged = damaged_file()
    if damaged:  # every rank would fail loading it, and under Ray's max_failures retry it
        raise ConfigError(f"run.name={cfg.run.name!r}: its latest checkpoint {where(latest)} is damaged: {damaged}; "
                          f"move it aside to resume from the one before it (mv {where(latest)} "
                          f"{where(f'damaged_{latest}')}), or choose another run.name")


def read_trainer_state(path: str | Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def checkpoint_step(path: str | Path) -> int:
    return int(read_trainer_state(path)["step"])


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under a run directory, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and is_complete(p)]
    return max(candidates, key=checkpoint_step, default=None)


def load_config(path: str | Path) -> TrainConfig:
    return config_from_dict(json.loads((Path(path) / "config.json").read_text()))


def load_consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage and any number of ranks."""
    import torch

    path = Path(path)
    ds_dir = path / DEEPSPEED_DIR
    if not (ds_dir / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {DEEPSPEED_DIR}/{DEEPSPEED_TAG})")
    stage = load_config(path).deepspeed.zero_stage
    if stage == 0:  # no ZeRO partitioning: rank 0's model states hold the whole module
        states = torch.load(ds_dir / DEEPSPEED_TAG / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are diagnostics, not output
        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG)


def load_model(path: str | Path):
    """(model in eval mode, tokenizer, config) from a training checkpoint, on the CPU."""
    from lm.model import GPT

    cfg = load_config(path)
    model = GPT(cfg.model)
    state = load_consolidated_state_dict(path)
    state.setdefault("lm_head.weight", state["wte.weight"])  # tied weights may be saved once
    model.load_state_dict(state)
    return model.eval(), load_tokenizer(Path(path) / "tokenizer.json"), cfg


def remove_checkpoint(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def commit_checkpoint_dir(staging: str | Path, final: str | Path) -> Path:
    """Rename a fully written checkpoint into place: readers never see a partial one."""
    os.replace(staging, final)
    return Path(final)
