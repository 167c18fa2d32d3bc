"""The model: causal in both variants, counts its parameters and FLOPs, checkpointing is exact."""

import dataclasses

import pytest
import torch

from lm.config import ModelConfig, RopeScalingConfig, mlp_hidden_size
from lm.model import EXPLICIT_ATTENTION_MAX_LEN, GPT, causal_attention, flops_per_token, one_query_attention


def small_model(variant: str, **overrides) -> GPT:
    torch.manual_seed(0)
    fields = dict(name="t", variant=variant, n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=97,
                  bias=variant == "gpt2")
    return GPT(ModelConfig(**{**fields, **overrides})).eval()


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_changing_token_t_never_changes_logits_before_t(variant):
    model = small_model(variant)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        with torch.no_grad():
            before, _ = model(idx)
            after, _ = model(changed)
        assert torch.equal(before[:, :t], after[:, :t]), f"logits before position {t} changed"
        assert not torch.allclose(before[:, t], after[:, t]), "the changed position itself must matter"


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_parameter_count_matches_the_architecture(variant):
    model = small_model(variant)
    C, V, L, T = 32, 97, 2, 16
    hidden = mlp_hidden_size(model.cfg)
    if variant == "gpt2":  # qkv+proj with biases, fc+proj with biases, two LayerNorms with biases
        per_block = (3 * C * C + 3 * C) + (C * C + C) + (C * hidden + hidden) + (hidden * C + C) + 4 * C
        expected = V * C + L * per_block + 2 * C  # tied head counted once; final LayerNorm
        assert model.num_params(non_embedding=False) == expected + T * C
    else:  # no biases, SwiGLU's fused gate+up, RMSNorm gains
        per_block = 3 * C * C + C * C + C * 2 * hidden + hidden * C + 2 * C
        expected = V * C + L * per_block + C
    assert model.num_params() == expected
    assert flops_per_token(model.cfg, T, expected) == 6 * expected + 12 * L * C * T


def with_each_kv_head_repeated(state: dict, cfg: ModelConfig) -> dict:
    """A grouped-query model's weights as multi-head attention's: each key/value head's rows repeated
    for its group of consecutive query heads (Hugging Face's repeat_kv order)."""
    C, D, kv = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.n_kv_head
    out = {}
    for name, tensor in state.items():
        if name.endswith("attn.c_attn.weight"):
            q, k, v = tensor.split((C, kv * D, kv * D))
            k, v = (t.view(kv, D, C).repeat_interleave(cfg.n_head // kv, dim=0).reshape(C, C) for t in (k, v))
            tensor = torch.cat([q, k, v])
        out[name] = tensor
    return out


def test_grouped_query_attention_is_multi_head_attention_with_each_kv_head_repeated():
    """n_kv_head=2 of 4 heads: the same logits and loss as the 4-head model whose key/value heads are
    the 2 repeated, in evaluation (SDPA) and training (written out), and key/value gradients that are
    the sums of the repeated heads' gradients; a quarter fewer attention parameters per block here."""
    grouped = small_model("llama", n_kv_head=2)
    full = small_model("llama")
    full.load_state_dict(with_each_kv_head_repeated(grouped.state_dict(), grouped.cfg))
    C, D = 32, 8
    assert full.num_params() - grouped.num_params() == 2 * 2 * (2 * D * C)  # 2 layers, k and v, 2 heads fewer
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(grouped(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)
    losses = []
    for model in (grouped, full):
        _, loss = model.train()(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name, gradient in grouped.named_parameters():
        full_gradient = dict(full.named_parameters())[name].grad
        if name.endswith("attn.c_attn.weight"):  # the repeated heads' gradients, summed per group
            q, k, v = full_gradient.split(C)
            k, v = (t.view(2, 2, D, C).sum(1).reshape(2 * D, C) for t in (k, v))
            full_gradient = torch.cat([q, k, v])
        torch.testing.assert_close(gradient.grad, full_gradient, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaling", [RopeScalingConfig(), RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 4),
                                     RopeScalingConfig("linear", 4.0)], ids=["plain-rope", "llama3-rope", "linear-rope"])
def test_llama_exports_to_transformers_with_its_key_value_heads_and_rope_scaling(scaling):
    """transformers' LlamaForCausalLM from our config.json gives our logits: grouped-query attention
    (num_key_value_heads) and RoPE scaling (rope_scaling, with a pretraining context of 4 positions here
    so all 16 reach every band) included; a scaled model's logits are not the plain one's."""
    import transformers

    from lm.hf_format import hf_config, to_hf_state_dict

    model = small_model("llama", n_kv_head=2, rope_scaling=scaling)
    config = hf_config(model.cfg)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    with torch.no_grad():  # larger queries and keys than at init, so positions move the logits visibly
        for block in model.h:
            block.attn.c_attn.weight.mul_(20)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the embedding
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)[0]
        torch.testing.assert_close(theirs.eval()(idx).logits, ours, rtol=1e-5, atol=1e-5)
        if scaling.type != "none":
            plain = small_model("llama", n_kv_head=2)
            plain.load_state_dict(model.state_dict())
            assert not torch.allclose(plain(idx)[0], ours, rtol=1e-3, atol=1e-3)


def test_query_key_value_biases_alone_export_as_transformers_qwen2_and_come_back():
    """Llama's layout with biases in the query/key/value projection only (model.qkv_bias): Hugging Face's
    Qwen2ForCausalLM, which gives our logits; its config.json reads back as the same architecture."""
    import transformers

    from lm.hf_format import hf_config, model_config_from_hf, to_hf_state_dict

    model = small_model("llama", n_kv_head=2, qkv_bias=True)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.bias.normal_(0, 0.5)
    assert model.h[0].attn.c_proj.bias is None and model.h[0].mlp.c_fc.bias is None
    config = hf_config(model.cfg)
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config))
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)
    assert model_config_from_hf(config, "t") == dataclasses.replace(model.cfg, mlp_hidden=mlp_hidden_size(model.cfg))


def test_output_head_is_tied_to_the_embedding():
    model = small_model("gpt2")
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant):
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = small_model(variant, activation_checkpointing=checkpointing).train()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sequences_longer_than_the_context_are_rejected():
    model = small_model("gpt2")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_heads", [3, 6])
def test_one_query_attention_equals_sdpa_with_and_without_the_mask(dtype, query_heads):
    """The compiled decode step's attention (multiply-and-sum) against SDPA, the eager step's; with 6
    query heads over 3 key/value heads, grouped-query attention."""
    torch.manual_seed(0)
    q = torch.randn(4, query_heads, 1, 16, dtype=dtype)
    keys, values = (torch.randn(4, 3, 9, 16, dtype=dtype) for _ in range(2))
    positions = torch.tensor([8, 0, 5, 2])
    mask = (torch.arange(9) <= positions[:, None])[:, None, None]
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for m in (mask, None):
        expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=m,
                                                                    enable_gqa=query_heads != 3)
        torch.testing.assert_close(one_query_attention(q, keys, values, m), expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 37, EXPLICIT_ATTENTION_MAX_LEN, EXPLICIT_ATTENTION_MAX_LEN + 1])
@pytest.mark.parametrize("query_heads", [3, 6])
def test_causal_attention_equals_sdpa_forward_and_backward(dtype, length, query_heads):
    """The written-out form (training on CPU up to EXPLICIT_ATTENTION_MAX_LEN) and the flash kernel beyond
    it give SDPA's outputs and gradients; queries arrive strided, as the model's transposed heads do.
    With 6 query heads over 3 key/value heads: grouped-query attention."""
    torch.manual_seed(0)
    qkv = torch.randn(2, length, query_heads + 6, 16, dtype=torch.float64)  # (B, T, q heads + k, v heads, D)
    grad_out = torch.randn(2, query_heads, length, 16, dtype=torch.float64)
    results = []
    for attention in (causal_attention, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=query_heads != 3)):
        leaf = qkv.clone().to(dtype).requires_grad_()
        q, k, v = leaf.split((query_heads, 3, 3), dim=2)
        out = attention(*(t.transpose(1, 2) for t in (q, k, v)))
        out.backward(grad_out.to(dtype))
        results.append((out.float(), leaf.grad.float()))
    # bf16: the written-out form rounds the scores to bf16 (the flash kernel keeps them in fp32)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(results[0][0], results[1][0], **tolerance)
    torch.testing.assert_close(results[0][1], results[1][1], **tolerance)


def test_causal_attention_dropout_drops_and_rescales_the_weights():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))  # training: the written-out form
    exact = causal_attention(q, k, v)
    torch.testing.assert_close(causal_attention(q, k, v, dropout_p=0.0), exact)
    dropped = causal_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, exact)
    torch.testing.assert_close(dropped[:, :, 0], torch.zeros_like(dropped[:, :, 0]).where(
        dropped[:, :, 0] == 0, exact[:, :, 0] * 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation,hf_name", [("gelu_tanh", "gelu_new"), ("gelu", "gelu")])
def test_gpt2_activation_is_the_one_transformers_computes_from_the_exported_config(activation, hf_name):
    import transformers

    from lm.hf_format import hf_config, to_hf_state_dict

    model = small_model("gpt2", activation=activation)
    with torch.no_grad():  # pre-activations of order 1, where the two GELUs differ most
        for block in model.h:
            block.mlp.c_fc.weight.mul_(50)
    config = hf_config(model.cfg)
    assert config["activation_function"] == hf_name
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name in ("gelu_new", "gelu"):
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, "activation_function": name}))
        theirs.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
        with torch.no_grad():
            logits[name] = theirs.eval()(idx).logits
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(logits[hf_name], ours, rtol=1e-5, atol=1e-5)
    other = "gelu" if hf_name == "gelu_new" else "gelu_new"
    assert not torch.allclose(logits[other], ours, rtol=1e-5, atol=1e-5)  # the other GELU would fail it
