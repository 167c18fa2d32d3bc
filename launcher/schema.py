"""Typed config at the Hydra boundary: register the schema, turn a composed config into objects."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lm.config import ConfigError, TrainConfig, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "hydra_conf"


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig, check: bool = True) -> TrainConfig:
    """The composed config as dataclasses, validated unless `check=False` (raises ConfigError)."""
    typed: TrainConfig = OmegaConf.to_object(cfg)
    if check:
        validate(typed)
    return typed


def check_group_choices(argv: list[str], groups: tuple[str, ...]) -> None:
    """Fail with one line on `group=option` overrides that name no file in hydra_conf/<group>/.

    Hydra itself reports this too, but over several lines; users asked for one line naming the
    field and the allowed values, before anything else happens.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key not in groups or value in ("", "null"):
            continue
        options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options:
                raise ConfigError(f"{key}={choice!r} is not an option: allowed values are {', '.join(options)}")


def fail(error: Exception) -> None:
    """Print a config error as one line and exit with status 2, as argparse does."""
    print(f"config error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def absolute(path: str) -> str:
    """Absolute local paths (workers do not share the driver's cwd); URIs pass through."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
