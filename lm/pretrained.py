"""Weights to start a fine-tune from: a directory written by our export, or a local Hugging Face
directory of a GPT-2 or Llama model (config.json + model.safetensors or pytorch_model.bin, whole or
sharded with an index, as save_pretrained writes them).

The directory decides the architecture and the tokenizer. It may be in an object store (a URI): its
files are then mirrored on each machine that reads them. Nothing is fetched from a model hub: a hub
id (`gpt2`, `meta-llama/Llama-3.2-1B`) is refused with a pointer to a local copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lm.chat_template import ChatTemplateError
from lm.config import ConfigError, ModelConfig, TrainConfig, config_from_dict
from lm.hf_format import UnsupportedModelError, from_hf_state_dict, model_config_from_hf
from lm.remote_files import is_uri, mirror_directory
from lm.tokenizer import Tokenizer, hf_directory_tokenizer, load_tokenizer

if TYPE_CHECKING:  # imported where weights load: checking a command line must not pay torch's import
    import torch

    from lm.model import GPT

FIELD = "trainer.init_from"
# What may differ from the pretrained model: everything else is its architecture.
NON_ARCHITECTURE_FIELDS = ("name", "dropout", "activation_checkpointing")


@dataclass
class PretrainedSource:
    path: Path
    kind: str  # "export" (ours) or "hf"
    model: ModelConfig

    def tokenizer(self) -> Tokenizer:
        if self.kind == "export":
            return load_tokenizer(self.path / "tokenizer.json")
        try:
            return hf_directory_tokenizer(self.path, _hf_config(self.path).get("eos_token_id"))
        except (FileNotFoundError, ChatTemplateError) as error:
            raise ConfigError(f"{FIELD}={str(self.path)!r}: {error}") from None


def _hf_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def pretrained_cache() -> Path:
    """Where a `trainer.init_from` URI's files are mirrored on each machine."""
    return Path(os.environ.get("LMSTACK_PRETRAINED_CACHE", "~/.cache/lmstack/pretrained")).expanduser()


def inspect_pretrained(init_from: str) -> PretrainedSource:
    """What `init_from` holds (reads config files only: cheap, before any worker starts). A URI
    (`s3://bucket/runs/<run>/exports/<export>`) is mirrored first, on every machine that reads it."""
    if is_uri(init_from):
        path = mirror_directory(init_from, pretrained_cache(), FIELD)
    else:
        path = Path(init_from).expanduser()
    if not path.is_dir():
        if not path.exists() and not init_from.startswith((".", "/", "~")):
            hint = (" (it looks like a Hugging Face hub id: this stack never downloads; save the model with "
                    "save_pretrained or `huggingface-cli download --local-dir` and pass that directory)")
        else:
            hint = ""
        raise ConfigError(f"{FIELD}={init_from!r} is not a local directory{hint}; allowed: a directory written by "
                          "launcher.export, or a Hugging Face GPT-2/Llama directory")
    path = path.resolve()
    if (path / "export.json").exists():
        saved = json.loads((path / "config.json").read_text())
        return PretrainedSource(path, "export", config_from_dict(saved["model"], ModelConfig))
    if not (path / "config.json").exists():
        raise ConfigError(f"{FIELD}={init_from!r} has no config.json; allowed: a directory written by "
                          "launcher.export, or a Hugging Face GPT-2/Llama directory")
    try:
        _hf_weight_files(path)
    except FileNotFoundError as error:
        raise ConfigError(f"{FIELD}={init_from!r}: {error}") from None
    try:
        model = model_config_from_hf(_hf_config(path), name=path.name)
    except UnsupportedModelError as error:
        raise ConfigError(f"{FIELD}={init_from!r}: {error}") from None
    except KeyError as error:
        raise ConfigError(f"{FIELD}={init_from!r}: config.json lacks {error.args[0]!r}") from None
    return PretrainedSource(path, "hf", model)


# A Hugging Face directory's weights: one file, or shards listed by an index (save_pretrained shards
# models over its max_shard_size, 5 GB by default: Llama 3.2 3B and up). safetensors first, as transformers.
HF_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
              ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _hf_weight_files(path: Path) -> list[Path]:
    """The files that hold a Hugging Face directory's weights; FileNotFoundError names what is missing."""
    for single, index in HF_WEIGHTS:
        if (path / single).exists():
            return [path / single]
        if (path / index).exists():
            names = set(json.loads((path / index).read_text())["weight_map"].values())
            shards = [path / name for name in sorted(names)]
            missing = [shard.name for shard in shards if not shard.exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in the directory: {', '.join(missing)}")
            return shards
    raise FileNotFoundError("no weights: the directory needs model.safetensors or pytorch_model.bin, or their "
                            "sharded form with model.safetensors.index.json or pytorch_model.bin.index.json")


def apply_pretrained_architecture(model: ModelConfig, source: PretrainedSource, explicit: set[str]) -> ModelConfig:
    """The run's model config: the pretrained architecture, plus the non-architecture settings.
    A field the user set explicitly (`explicit`) that contradicts the checkpoint is an error."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in explicit and f.name not in NON_ARCHITECTURE_FIELDS and f.name != "vocab_size":
            ours, theirs = getattr(model, f.name), getattr(source.model, f.name)
            if ours != theirs:
                raise ConfigError(f"model.{f.name}={ours!r} contradicts {FIELD}={str(source.path)!r}, which has "
                                  f"{f.name}={theirs!r}; drop the override (the architecture comes from the checkpoint)")
    return dataclasses.replace(source.model, dropout=model.dropout,
                               activation_checkpointing=model.activation_checkpointing,
                               name=model.name if "name" in explicit else source.model.name)


def dataset_tokenizer(cfg: TrainConfig) -> Tokenizer | None:
    """The tokenizer a run's data is encoded with when it is not trained on the corpus."""
    return inspect_pretrained(cfg.trainer.init_from).tokenizer() if cfg.trainer.init_from else None


def load_hf_directory(path: str | Path):
    """A local Hugging Face model directory as our model (in eval mode) and its tokenizer: to sample from
    or score a pretrained model before fine-tuning it. ConfigError names what it cannot represent."""
    from lm.model import GPT

    try:
        source = inspect_pretrained(str(path))
    except ConfigError as error:  # named for this path, not for the training setting
        raise ConfigError(str(error).removeprefix(f"{FIELD}=")) from None
    model = GPT(source.model)
    load_pretrained(model, str(path))
    return model.eval(), source.tokenizer()


# What vLLM (`--generation-config auto`, its default) takes from a model's generation_config.json as
# the defaults of requests that do not set them.
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(directory: str | Path) -> dict[str, float]:
    """The sampling values a model directory's generation_config.json sets (Qwen's: temperature 0.7,
    top_p 0.8, top_k 20, repetition_penalty 1.05); a top_k of 0 or less is transformers' "off"."""
    path = Path(directory) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    values = {key: config[key] for key in SAMPLING_DEFAULTS
              if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)}
    if values.get("top_k", 1) <= 0:
        del values["top_k"]
    return values


def load_pretrained(model: GPT, init_from: str) -> None:
    """Fine-tuning: start from pretrained weights (a full model on this rank)."""
    state = load_pretrained_state_dict(init_from, model.cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"trainer.init_from={init_from!r}: weights do not match the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_pretrained_state_dict(init_from: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full-precision weights under our parameter names, ready for `GPT.load_state_dict`."""
    import torch

    source = inspect_pretrained(init_from)
    if source.kind == "export":
        from lm.export import model_from_export_state
        from safetensors.torch import load_file

        precision = json.loads((source.path / "config.json").read_text())["precision"]
        model = model_from_export_state(load_file(str(source.path / "model.safetensors")), source.model, precision)
        return {k: v.float() for k, v in model.state_dict().items()}
    hf_state: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(source.path):
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            hf_state.update(load_file(str(file)))
        else:
            hf_state.update(torch.load(file, map_location="cpu", weights_only=True))
    return {k: v.float() for k, v in from_hf_state_dict(hf_state, cfg).items()}
