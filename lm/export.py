"""Training checkpoint -> serving artifact: consolidated weights in fp32, bf16 or int8, checked
against the fp32 model's validation perplexity, written atomically.

An export directory holds
    model.safetensors   our parameter names, in the export precision (int8: weight + weight_scale)
    config.json         the model config (ours), and the precision
    tokenizer.json      the run's tokenizer (chat_template.json beside it: a pretrained model's own template)
    export.json         precision, source checkpoint, step, perplexity before/after, when it was written
    hf/                 the same weights in Hugging Face layout (config.json, model.safetensors,
                        tokenizer.json, and for BPE tokenizer_config.json with the chat template and
                        generation_config.json with the tokens that end a reply)
                        for transformers and vLLM; int8 exports write bf16 there
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lm.checkpoint import checkpoint_step, load_model
from lm.config import ConfigError, ModelConfig, config_from_dict
from lm.shard_loader import TokenShardLoader
from lm.hf_format import hf_config, hf_generation_config, hf_tokenizer_config, to_hf_state_dict
from lm.model import GPT
from lm.staging import staged_directory
from lm.tokenizer import ByteBPETokenizer, copy_tokenizer, load_tokenizer

PRECISIONS = ("fp32", "bf16", "int8")
EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "export.json")


class ExportQualityError(RuntimeError):
    """The artifact's perplexity rose more than allowed over the fp32 checkpoint's."""


def _is_quantized_matrix(name: str, tensor: torch.Tensor) -> bool:
    # The block matmuls carry the weight; embeddings (and the tied head) and norms stay precise.
    return tensor.dim() == 2 and name.startswith("h.") and name.endswith(".weight")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ~= q * scale[:, None]."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def export_state(state: dict[str, torch.Tensor], precision: str, tied: bool = True) -> dict[str, torch.Tensor]:
    """The tensors as stored: a tied head is dropped (the embedding is the head)."""
    state = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    if precision == "fp32":
        return {k: v.float().contiguous() for k, v in state.items()}
    if precision == "bf16":
        return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    out = {}
    for name, tensor in state.items():
        if _is_quantized_matrix(name, tensor):
            out[name], out[name + "_scale"] = quantize_int8(tensor.float())
        else:
            out[name] = tensor.float().contiguous()
    return out


def model_from_export_state(stored: dict[str, torch.Tensor], cfg: ModelConfig, precision: str) -> GPT:
    """A plain GPT with the artifact's weights (int8 dequantized): for the Hugging Face copy and
    fine-tuning. `serving_model` is what the server computes with."""
    state = {}
    for name, tensor in stored.items():
        if name.endswith("_scale"):
            continue
        if tensor.dtype == torch.int8:
            tensor = tensor.float() * stored[name + "_scale"][:, None]
        state[name] = tensor
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model = GPT(cfg)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.load_state_dict({k: v.to(model.wte.weight.dtype) for k, v in state.items()})
    return model.eval()


def serving_model(stored: dict[str, torch.Tensor], cfg: ModelConfig, precision: str) -> GPT:
    """The model the server runs for an artifact. int8: every block matrix computes in int8 with its
    stored weights and scales, and the output head with the embedding quantized per row the same way."""
    from lm.inference import Int8Linear

    model = model_from_export_state(stored, cfg, precision)
    if precision != "int8":
        return model
    for name, tensor in stored.items():
        if tensor.dtype == torch.int8:
            owner_name, _ = name.rsplit(".", 1)  # h.0.attn.c_attn.weight -> h.0.attn.c_attn
            parent_name, child = owner_name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            bias = getattr(parent, child).bias
            setattr(parent, child, Int8Linear(tensor, stored[name + "_scale"], None if bias is None else bias.detach()))
    head = model.wte.weight if cfg.tie_embeddings else model.lm_head.weight
    model.lm_head = Int8Linear(*quantize_int8(head.detach().float()), None)
    return model.eval()


@torch.no_grad()
def validation_perplexity(model: GPT, val_tokens: np.ndarray, seq_len: int, batches: int, batch_size: int = 4) -> float:
    """Perplexity over the same fixed val windows for every model compared."""
    loader = TokenShardLoader(val_tokens, seq_len, batch_size, rank=0, world_size=1, seed=0)
    total, count = 0.0, 0
    for _ in range(batches):
        x, y = loader.next_batch()
        _, loss = model(x, y)
        total, count = total + loss.item() * y.numel(), count + y.numel()
    return math.exp(total / count)


def inherited_sampling_defaults(train_cfg) -> dict:
    """A fine-tune keeps its pretrained model's sampling defaults (generation_config.json's temperature,
    top_p, ...), as transformers' save_pretrained keeps a model's generation config; read where
    trainer.init_from is a local directory (a Hugging Face one, or an export's hf/)."""
    from lm.pretrained import sampling_defaults

    init_from = train_cfg.trainer.init_from
    if not (init_from and Path(init_from).is_dir()):
        return {}
    return sampling_defaults(Path(init_from) / "hf" if is_complete_export(init_from) else init_from)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, precision: str, val_tokens: np.ndarray,
                      max_ppl_increase: float = 0.02, force: bool = False, eval_batches: int = 16) -> dict:
    """Write an export of `checkpoint` to `out_dir` (atomically) and return its report."""
    from safetensors.torch import save_file

    if precision not in PRECISIONS:
        raise ConfigError(f"export.precision={precision!r} is invalid: allowed values are {', '.join(PRECISIONS)}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    reference, tokenizer, train_cfg = load_model(checkpoint)
    cfg = train_cfg.model
    seq_len = train_cfg.data.block_size or cfg.block_size
    stored = export_state(reference.state_dict(), precision, cfg.tie_embeddings)
    exported = model_from_export_state(stored, cfg, precision)
    before = validation_perplexity(reference, val_tokens, seq_len, eval_batches)
    served = serving_model(stored, cfg, precision)
    after = validation_perplexity(served, val_tokens, seq_len, eval_batches)
    if precision == "int8":  # the compiled engine's kernels (per CPU) round otherwise than FBGEMM: gate the worst
        from lm.inference import INT8_KERNELS, use_int8_activations

        for kernel in INT8_KERNELS:
            use_int8_activations(served, kernel=kernel)
            after = max(after, validation_perplexity(served, val_tokens, seq_len, eval_batches))
    increase = after / before - 1.0
    report = {"precision": precision, "source_checkpoint": str(checkpoint), "step": checkpoint_step(checkpoint),
              "val_perplexity_fp32": before, "val_perplexity": after, "ppl_increase": increase,
              "max_ppl_increase": max_ppl_increase, "forced": force and increase > max_ppl_increase,
              "eval_tokens": eval_batches * 4 * seq_len}
    if increase > max_ppl_increase and not force:
        raise ExportQualityError(
            f"export.precision={precision}: validation perplexity rose {increase:.2%} ({before:.3f} -> {after:.3f}), "
            f"more than export.max_ppl_increase={max_ppl_increase:.2%}; nothing was written "
            "(export.force=true writes it anyway)")

    with staged_directory(out_dir) as staging:
        (staging / "hf").mkdir()
        save_file(stored, str(staging / "model.safetensors"), metadata={"precision": precision})
        config = {"model": dataclasses.asdict(cfg), "precision": precision}
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(checkpoint / "tokenizer.json", staging / "tokenizer.json")
        hf_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        hf_state = {k: v.to(hf_dtype) for k, v in to_hf_state_dict(exported.float().state_dict(), cfg).items()}
        save_file(hf_state, str(staging / "hf" / "model.safetensors"), metadata={"format": "pt"})
        hf = hf_config(cfg, tokenizer)
        hf["torch_dtype"] = "float32" if precision == "fp32" else "bfloat16"
        (staging / "hf" / "config.json").write_text(json.dumps(hf, indent=2))
        shutil.copyfile(checkpoint / "tokenizer.json", staging / "hf" / "tokenizer.json")  # its template: below
        if isinstance(tokenizer, ByteBPETokenizer):  # (a character vocabulary is ours alone, not a HF tokenizer)
            (staging / "hf" / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(tokenizer, cfg), indent=2))
            generation = {**inherited_sampling_defaults(train_cfg), **hf_generation_config(tokenizer, hf)}
            (staging / "hf" / "generation_config.json").write_text(json.dumps(generation, indent=2))
        report["created"] = int(time.time())  # unix seconds, as OpenAI's model objects give it
        (staging / "export.json").write_text(json.dumps(report, indent=2))  # last: marks complete
    return report


def is_complete_export(path: str | Path) -> bool:
    return all((Path(path) / name).exists() for name in EXPORT_FILES)


def load_export(path: str | Path, device: str = "cpu"):
    """(model as served, tokenizer, model config, precision) from an export directory. On a GPU the
    int8 weights are dequantized (the int8 kernels here are CPU kernels); bf16 and fp32 run as stored."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete_export(path):
        raise FileNotFoundError(f"{path} is not a complete export (needs {', '.join(EXPORT_FILES)})")
    config = json.loads((path / "config.json").read_text())
    cfg = config_from_dict(config["model"], ModelConfig)
    stored = load_file(str(path / "model.safetensors"))
    if device == "cpu":
        model = serving_model(stored, cfg, config["precision"])
    else:
        model = model_from_export_state(stored, cfg, config["precision"]).to(device)
    return model, load_tokenizer(path / "tokenizer.json"), cfg, config["precision"]
