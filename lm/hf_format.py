"""Our weights in Hugging Face's layout and back: `GPT2LMHeadModel` for the gpt2 variant and
`LlamaForCausalLM` for the llama variant, so `transformers` (and vLLM) load an export directly, and
a local Hugging Face directory of either architecture (or of Mistral, Llama's under another name, or
Qwen2, Llama's with query/key/value biases, written back as `Qwen2ForCausalLM`) initializes a fine-tune.

Only names and shapes change: GPT-2's `Conv1D` stores (in, out) where our `nn.Linear` stores
(out, in); Llama keeps q/k/v and gate/up as separate matrices where we fuse them. Missing biases
(bias=false) become zeros, which is the same function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lm.chat_template import BUILTIN
from lm.config import ModelConfig, RopeScalingConfig, has_qkv_bias, kv_heads, mlp_hidden_size
from lm.tokenizer import bos_ids, stop_ids

if TYPE_CHECKING:  # torch is imported where tensors are converted: reading a config.json needs none
    import torch


# model.activation <-> transformers' activation_function (GPT-2); both tanh names compute the same.
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
FROM_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def hf_tokenizer_config(tokenizer, cfg: ModelConfig) -> dict:
    """tokenizer_config.json: with it `AutoTokenizer` loads tokenizer.json as a fast tokenizer that
    knows its end-of-text token, context and chat template (`apply_chat_template`; vLLM's chat API
    needs one), so a fine-tuned model is prompted as our server prompts it: with the pretrained model's
    own template and special tokens where it brought them, else ours."""
    eot = None if tokenizer.eot_id is None else tokenizer.decode([tokenizer.eot_id])
    bos = tokenizer.decode(bos) if (bos := bos_ids(tokenizer)) else eot
    template = tokenizer.chat_template or BUILTIN
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
            "bos_token": bos, "eos_token": eot, "clean_up_tokenization_spaces": False,
            **template.special_tokens, "chat_template": template.source}


def hf_config(cfg: ModelConfig, tokenizer=None) -> dict:
    """config.json for transformers: end-of-text is EOS, and BOS too (as in GPT-2) unless the tokenizer
    puts a BOS of its own before a text (Llama's)."""
    eot_id = getattr(tokenizer, "eot_id", None)
    bos_id = bos[0] if tokenizer is not None and (bos := bos_ids(tokenizer)) else eot_id
    return {**_architecture(cfg), "bos_token_id": bos_id, "eos_token_id": eot_id, "torch_dtype": "float32"}


def hf_generation_config(tokenizer, config: dict) -> dict:
    """generation_config.json: transformers' `generate` (and vLLM) stop at every token our engine stops
    at (an instruct model's end of turn besides end-of-text, as Llama 3 Instruct's lists them)."""
    stops = sorted(stop_ids(tokenizer))
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": stops[0] if len(stops) == 1 else stops or None}


def _architecture(cfg: ModelConfig) -> dict:
    if cfg.variant == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": mlp_hidden_size(cfg),
            "activation_function": HF_ACTIVATIONS[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
            "scale_attn_weights": True,
        }
    if is_qwen2(cfg):
        return {**_llama_architecture(cfg), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "use_sliding_window": False}
    return {**_llama_architecture(cfg), "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def is_qwen2(cfg: ModelConfig) -> bool:
    """Llama's layout with biases in the query/key/value projection alone: Hugging Face calls it Qwen2
    (`Qwen2ForCausalLM`); Llama's `attention_bias` would add one to the output projection too."""
    return cfg.variant == "llama" and has_qkv_bias(cfg) and not cfg.bias


def _llama_architecture(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": mlp_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": kv_heads(cfg), "head_dim": cfg.n_embd // cfg.n_head,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, **_hf_rope_scaling(cfg),
    }


def _hf_rope_scaling(cfg: ModelConfig) -> dict:
    """config.json's rope_scaling when RoPE is scaled (the spelling transformers 4 and 5 and vLLM all read)."""
    r = cfg.rope_scaling
    if r.type == "none":
        return {}
    if r.type == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": r.factor}}
    return {"rope_scaling": {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                             "high_freq_factor": r.high_freq_factor,
                             "original_max_position_embeddings": r.original_max_position_embeddings}}


def _bias(state: dict, name: str, size: int) -> torch.Tensor:
    return state[name] if name in state else state["wte.weight"].new_zeros(size)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    C, hidden = cfg.n_embd, mlp_hidden_size(cfg)
    kv_width = kv_heads(cfg) * (C // cfg.n_head)
    out: dict[str, torch.Tensor] = {}
    if cfg.variant == "gpt2":
        out["transformer.wte.weight"] = state["wte.weight"]
        out["transformer.wpe.weight"] = state["wpe.weight"]
        for i in range(cfg.n_layer):
            ours, theirs = f"h.{i}.", f"transformer.h.{i}."
            for norm in ("ln_1", "ln_2"):
                out[theirs + f"{norm}.weight"] = state[ours + f"{norm}.weight"]
                out[theirs + f"{norm}.bias"] = _bias(state, ours + f"{norm}.bias", C)
            for module, width in (("attn.c_attn", 3 * C), ("attn.c_proj", C), ("mlp.c_fc", hidden), ("mlp.c_proj", C)):
                out[theirs + f"{module}.weight"] = state[ours + f"{module}.weight"].t().contiguous()
                out[theirs + f"{module}.bias"] = _bias(state, ours + f"{module}.bias", width)
        out["transformer.ln_f.weight"] = state["ln_f.weight"]
        out["transformer.ln_f.bias"] = _bias(state, "ln_f.bias", C)
    else:
        out["model.embed_tokens.weight"] = state["wte.weight"]
        for i in range(cfg.n_layer):
            ours, theirs = f"h.{i}.", f"model.layers.{i}."
            out[theirs + "input_layernorm.weight"] = state[ours + "ln_1.weight"]
            out[theirs + "post_attention_layernorm.weight"] = state[ours + "ln_2.weight"]
            q, k, v = state[ours + "attn.c_attn.weight"].split((C, kv_width, kv_width), dim=0)
            gate, up = state[ours + "mlp.c_fc.weight"].split(hidden, dim=0)
            pieces = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                      "self_attn.o_proj": state[ours + "attn.c_proj.weight"], "mlp.gate_proj": gate,
                      "mlp.up_proj": up, "mlp.down_proj": state[ours + "mlp.c_proj.weight"]}
            for name, weight in pieces.items():
                out[theirs + f"{name}.weight"] = weight.clone()  # own storage: safetensors refuses views
            biases = {}
            if cfg.bias or has_qkv_bias(cfg):  # Llama's attention_bias covers q, k, v and o; Qwen2's q, k, v
                qkv = _bias(state, ours + "attn.c_attn.bias", C + 2 * kv_width)
                biases.update(zip(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                  qkv.split((C, kv_width, kv_width))))
            if cfg.bias:
                gb, ub = state[ours + "mlp.c_fc.bias"].split(hidden)
                biases.update({"self_attn.o_proj": state[ours + "attn.c_proj.bias"], "mlp.gate_proj": gb,
                               "mlp.up_proj": ub, "mlp.down_proj": state[ours + "mlp.c_proj.bias"]})
            for name, bias in biases.items():
                out[theirs + f"{name}.bias"] = bias.clone()
        out["model.norm.weight"] = state["ln_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out  # a tied lm_head.weight is the embedding (tie_word_embeddings): not stored twice


# ---------------------------------------------------------------------------------------------
# Hugging Face -> ours (fine-tuning from a local directory).


class UnsupportedModelError(ValueError):
    """A Hugging Face config this model cannot represent exactly; the message names the field."""


def _refuse(field: str, value, allowed: str) -> None:
    raise UnsupportedModelError(f"config.json {field}={value!r} is not supported: {allowed}")


def model_config_from_hf(hf: dict, name: str) -> ModelConfig:
    """Our ModelConfig for a GPT-2, Llama, Mistral or Qwen2 config.json; anything we would compute
    differently is refused."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in FROM_HF_ACTIVATIONS:
            _refuse("activation_function", activation, ", ".join(FROM_HF_ACTIVATIONS))
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                _refuse(flag, hf[flag], "false")
        if not hf.get("scale_attn_weights", True):
            _refuse("scale_attn_weights", False, "true")
        return ModelConfig(name=name, variant="gpt2", n_layer=hf["n_layer"], n_head=hf["n_head"],
                           n_embd=hf["n_embd"], block_size=hf["n_positions"], bias=True,
                           mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True), vocab_size=hf["vocab_size"],
                           activation=FROM_HF_ACTIVATIONS[activation])
    # Mistral is Llama's architecture plus an optional sliding window; Qwen2 is Llama's with biases in the
    # query/key/value projection, and an optional sliding window.
    if model_type in ("llama", "mistral", "qwen2"):
        windowed = hf.get("use_sliding_window", True) if model_type == "qwen2" else model_type == "mistral"
        if windowed and hf.get("sliding_window") is not None and hf["sliding_window"] < hf["max_position_embeddings"]:
            _refuse("sliding_window", hf["sliding_window"], "null (attention over the whole context)")
        heads, width = hf["num_attention_heads"], hf["hidden_size"]
        kv = hf.get("num_key_value_heads") or heads
        if heads % kv:
            _refuse("num_key_value_heads", kv, f"a divisor of num_attention_heads={heads}")
        if hf.get("head_dim", width // heads) != width // heads:
            _refuse("head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {width // heads}")
        if hf.get("hidden_act", "silu") != "silu":
            _refuse("hidden_act", hf["hidden_act"], "silu")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spelling
        rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        if model_type != "qwen2" and bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            _refuse("attention_bias", hf.get("attention_bias"), "the same as mlp_bias")
        return ModelConfig(name=name, variant="llama", n_layer=hf["num_hidden_layers"], n_head=heads,
                           n_kv_head=None if kv == heads else kv,
                           n_embd=width, block_size=hf["max_position_embeddings"],
                           bias=bool(hf.get("attention_bias", False)), qkv_bias=True if model_type == "qwen2" else None,
                           mlp_hidden=hf["intermediate_size"],
                           rope_theta=rope_theta, rope_scaling=_rope_scaling_from_hf(rope, hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
                           tie_embeddings=hf.get("tie_word_embeddings", False), vocab_size=hf["vocab_size"])
    _refuse("model_type", model_type, "gpt2, llama, mistral or qwen2")


def _rope_scaling_from_hf(rope: dict, hf: dict) -> RopeScalingConfig:
    """The inverse of `_hf_rope_scaling`; other RoPE types are refused."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return RopeScalingConfig()
    if rope_type == "linear":
        return RopeScalingConfig("linear", float(rope["factor"]))
    if rope_type == "llama3":
        return RopeScalingConfig("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                                 float(rope["high_freq_factor"]),
                                 int(rope.get("original_max_position_embeddings", hf["max_position_embeddings"])))
    _refuse("rope_parameters.rope_type", rope_type, "default (plain RoPE), llama3 or linear")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names and layouts -> ours (the inverse of `to_hf_state_dict`)."""
    import torch

    hf_state = {k.removeprefix("transformer.") if cfg.variant == "gpt2" else k: v for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.variant == "gpt2":
        out["wte.weight"], out["wpe.weight"] = hf_state["wte.weight"], hf_state["wpe.weight"]
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            for norm in ("ln_1", "ln_2"):
                out[p + f"{norm}.weight"], out[p + f"{norm}.bias"] = hf_state[p + f"{norm}.weight"], hf_state[p + f"{norm}.bias"]
            for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out[p + f"{module}.weight"] = hf_state[p + f"{module}.weight"].t().contiguous()  # Conv1D is (in, out)
                out[p + f"{module}.bias"] = hf_state[p + f"{module}.bias"]
        out["ln_f.weight"], out["ln_f.bias"] = hf_state["ln_f.weight"], hf_state["ln_f.bias"]
    else:
        out["wte.weight"] = hf_state["model.embed_tokens.weight"]
        for i in range(cfg.n_layer):
            ours, theirs = f"h.{i}.", f"model.layers.{i}."
            out[ours + "ln_1.weight"] = hf_state[theirs + "input_layernorm.weight"]
            out[ours + "ln_2.weight"] = hf_state[theirs + "post_attention_layernorm.weight"]
            for kind in ("weight", "bias") if has_qkv_bias(cfg) else ("weight",):
                out[ours + f"attn.c_attn.{kind}"] = torch.cat(
                    [hf_state[theirs + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], dim=0)
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                out[ours + f"attn.c_proj.{kind}"] = hf_state[theirs + f"self_attn.o_proj.{kind}"]
                out[ours + f"mlp.c_fc.{kind}"] = torch.cat(
                    [hf_state[theirs + f"mlp.{n}_proj.{kind}"] for n in ("gate", "up")], dim=0)
                out[ours + f"mlp.c_proj.{kind}"] = hf_state[theirs + f"mlp.down_proj.{kind}"]
        out["ln_f.weight"] = hf_state["model.norm.weight"]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    return out
