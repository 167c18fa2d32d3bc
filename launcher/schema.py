"""Typed config at the Hydra boundary: register the schema, turn a composed config into objects."""

from __future__ import annotations

import os
import sys
import typing
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lm.config import ConfigError, LoggingConfig, TrainConfig, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "hydra_conf"


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig, check: bool = True) -> TrainConfig:
    """The composed config as dataclasses, validated unless `check=False` (raises ConfigError)."""
    typed: TrainConfig = OmegaConf.to_object(cfg)
    apply_wandb_mode(typed.logging)
    if check:
        validate(typed)
    return typed


def apply_wandb_mode(logging: LoggingConfig) -> None:
    """logging.mode as W&B takes it, since WANDB_MODE may set it (hydra_conf/logging/wandb_offline.yaml):
    `disabled` turns W&B off (as logging=none), `dryrun` and `run` are W&B's old names for offline and
    online. A WANDB_MODE that is none of these is named as the source of the bad value."""
    if logging.backend != "wandb":
        return
    mode = {"dryrun": "offline", "run": "online"}.get(logging.mode, logging.mode)
    if mode == "disabled":
        logging.backend, mode = "none", "offline"
    elif mode not in ("offline", "online") and mode == os.environ.get("WANDB_MODE"):
        raise ConfigError(f"logging.mode={mode!r} (from WANDB_MODE) is invalid: allowed values are offline, online, "
                          "disabled")
    logging.mode = mode


# Hydra's own flags that take the next argument as their value; with a config or help flag the
# schema below may not be the config (or nothing is composed), so such commands are left to Hydra.
_FLAGS_WITH_A_VALUE = {"--cfg", "-c", "--package", "-p", "--experimental-rerun"}
_OTHER_CONFIG_OR_HELP = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--help", "-h",
                         "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


def check_overrides(argv: list[str], schema: type, groups: tuple[str, ...] = ()) -> None:
    """Fail with one line on an override Hydra would refuse: `group=option` naming no file in
    hydra_conf/<group>/, a key the schema does not have, or a value (each of a sweep's) that is not of
    the key's type.

    Hydra reports these too, but over several lines and after a trace hint; users asked for one line
    naming the field and the allowed values, before anything else happens. `+key=...` names a key the
    schema lacks (Hydra would add it, and the run would ignore it) or one it has (Hydra refuses).
    Deleting (`~key`), `hydra.*` keys and interpolations are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(arg.split("=")[0] in _OTHER_CONFIG_OR_HELP for arg in argv):
        return
    parser = OverridesParser.create()
    after_flag = False
    for arg in argv:
        if after_flag or arg.startswith("-") or "=" not in arg:
            after_flag = arg in _FLAGS_WITH_A_VALUE
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as error:
            raise ConfigError(f"{arg!r} is not an override Hydra can read: {str(error).splitlines()[0]}") from None
        key = override.key_or_group
        if override.is_delete() or override.package is not None or key.startswith("hydra") or "/" in key:
            continue
        values = _override_values(override)
        if key in groups:
            options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            for choice in values:
                if choice not in (None, "") and choice not in options:
                    raise ConfigError(f"{key}={choice!r} is not an option: allowed values are {', '.join(options)}")
        else:  # the schemas are closed: `+key` or `++key` adds nothing Hydra's merge would keep quietly
            _check_key(key, values, schema)
            if key in DERIVED:
                raise ConfigError(f"{key} cannot be set: {DERIVED[key]}")
            if override.is_add():
                raise ConfigError(f"+{key}: {key} is already a config key; set it without the +")


# Keys of the schema that the launcher fills in, so a value given for them would be overwritten.
DERIVED = {"model.vocab_size": "it is the tokenizer's vocabulary, padded to a multiple of 64 (set data.vocab_size, "
                               "the BPE vocabulary to learn, or trainer.init_from's model brings its own)"}


def check_command_line(schema: type, groups: tuple[str, ...] = ()) -> None:
    """check_overrides on this command's arguments: one line and exit 2 for a bad one."""
    try:
        check_overrides(sys.argv[1:], schema, groups)
    except ConfigError as error:
        fail(error)


def _override_values(override) -> list:
    """The override's value, or each value of its sweep (none for Optuna's intervals and globs)."""
    if not override.is_sweep_override():
        return [override.value()]
    if override.value_type.name in ("INTERVAL_SWEEP", "GLOB_CHOICE_SWEEP"):
        return []
    return list(override.sweep_iterator())


def _check_key(key: str, values: list, schema: type) -> None:
    """`key` names a field of the schema's dataclasses, and each value is of the field's type (as
    OmegaConf converts it, which is how Hydra will merge it)."""
    import dataclasses
    import difflib

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    section, path = schema, []
    for part in key.split("."):
        names = [f.name for f in dataclasses.fields(section)] if dataclasses.is_dataclass(section) else []
        if part not in names:
            where = ".".join(path)
            nearby = difflib.get_close_matches(part, names, n=1)
            close = _keys_elsewhere(part, schema, key, exact=True) or (
                ['.'.join(path + nearby)] if nearby else _keys_elsewhere(part, schema, key, exact=False))
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            keys = f"{where}'s keys" if where else "top-level keys"
            raise ConfigError(f"{key} is not a config key{hint}: {keys} are {', '.join(names)}")
        parent, path = section, path + [part]
        section = typing.get_type_hints(section)[part]
    node = OmegaConf.structured(parent)
    for value in values:
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved once the whole config is composed
        try:
            node[path[-1]] = value
        except OmegaConfBaseException:
            raise ConfigError(f"{key}={value!r} is invalid: must be {_described(section)}") from None


def _leaf_keys(schema: type, prefix: str = "") -> list[str]:
    """Every settable key of a schema, dotted (`optim.lr`)."""
    import dataclasses

    keys, kinds = [], typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        kind = kinds[field.name]
        name = prefix + field.name
        keys += _leaf_keys(kind, name + ".") if dataclasses.is_dataclass(kind) else [name]
    return keys


def _keys_elsewhere(part: str, schema: type, key: str, exact: bool) -> list[str]:
    """For a key put in the wrong section (`trainer.lr`, or a bare `max_steps`): the keys of that
    name in the other sections (`optim.lr`), or with `exact=False` of a name it starts or is close to."""
    import difflib

    if key.rsplit(".", 1)[-1] != part:
        return []  # a misspelt section, not a misplaced key
    keys = [k for k in _leaf_keys(schema) if k != key]
    leaves = sorted({k.rsplit(".", 1)[-1] for k in keys})
    if exact:
        close = [part] if part in leaves else []
    else:
        close = [leaf for leaf in leaves if leaf.startswith(part + "_")][:1] or \
            difflib.get_close_matches(part, leaves, n=1, cutoff=0.8)
    return [k for k in keys if close and k.rsplit(".", 1)[-1] == close[0]][:3]


def _described(kind) -> str:
    """A field's type in words, for the error naming it."""
    import dataclasses

    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union:
        return f"{_described(args[0])} or null"
    if typing.get_origin(kind) is list:
        return f"a list of {_described(args[0]).split(' ', 1)[1]}s"
    if dataclasses.is_dataclass(kind):
        return f"a section, set by its keys ({', '.join(f.name for f in dataclasses.fields(kind))})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def fail(error: Exception) -> None:
    """Print a config error as one line and exit with status 2, as argparse does."""
    print(f"config error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def absolute(path: str) -> str:
    """Absolute local paths (workers do not share the driver's cwd); URIs pass through."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
