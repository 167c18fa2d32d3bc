"""Our weights in Hugging Face's layout: `GPT2LMHeadModel` for the gpt2 variant and
`LlamaForCausalLM` for the llama variant, so `transformers` (and vLLM) load an export directly.

Only names and shapes change: GPT-2's `Conv1D` stores (in, out) where our `nn.Linear` stores
(out, in); Llama keeps q/k/v and gate/up as separate matrices where we fuse them. Missing biases
(bias=false) become zeros, which is the same function.
"""

from __future__ import annotations

import torch

from lm.config import ModelConfig, mlp_hidden_size


def hf_config(cfg: ModelConfig, eot_id: int | None = None) -> dict:
    """config.json for transformers; the end-of-text token is BOS and EOS, as in GPT-2."""
    return {**_architecture(cfg), "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32"}


def _architecture(cfg: ModelConfig) -> dict:
    if cfg.variant == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": mlp_hidden_size(cfg),
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True, "scale_attn_weights": True,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": mlp_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": 1e-5, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "tie_word_embeddings": True,
    }


def _bias(state: dict, name: str, size: int) -> torch.Tensor:
    return state.get(name, torch.zeros(size, dtype=state["wte.weight"].dtype))


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    C, hidden = cfg.n_embd, mlp_hidden_size(cfg)
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
            q, k, v = state[ours + "attn.c_attn.weight"].split(C, dim=0)
            gate, up = state[ours + "mlp.c_fc.weight"].split(hidden, dim=0)
            pieces = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                      "self_attn.o_proj": state[ours + "attn.c_proj.weight"], "mlp.gate_proj": gate,
                      "mlp.up_proj": up, "mlp.down_proj": state[ours + "mlp.c_proj.weight"]}
            for name, weight in pieces.items():
                out[theirs + f"{name}.weight"] = weight.clone()  # own storage: safetensors refuses views
            if cfg.bias:
                qb, kb, vb = state[ours + "attn.c_attn.bias"].split(C)
                gb, ub = state[ours + "mlp.c_fc.bias"].split(hidden)
                biases = {"self_attn.q_proj": qb, "self_attn.k_proj": kb, "self_attn.v_proj": vb,
                          "self_attn.o_proj": state[ours + "attn.c_proj.bias"], "mlp.gate_proj": gb,
                          "mlp.up_proj": ub, "mlp.down_proj": state[ours + "mlp.c_proj.bias"]}
                for name, bias in biases.items():
                    out[theirs + f"{name}.bias"] = bias.clone()
        out["model.norm.weight"] = state["ln_f.weight"]
    return out  # lm_head.weight is tied to the embedding (tie_word_embeddings): not stored twice
