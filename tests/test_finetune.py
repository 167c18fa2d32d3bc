"""Fine-tuning from pretrained weights (`trainer.init_from`) and on chat data (`data=chat`):
Hugging Face GPT-2, Llama (Llama 3's grouped-query attention and RoPE scaling, sharded weights),
Mistral and Qwen2 directories and our own exports load with equal logits; ZeRO-2 and ZeRO-3
fine-tunes on 2 ranks start from those weights and lower the loss; the prompt carries no loss; bad
chat lines are reported by line number; contradicting overrides and hub ids fail with one line
naming the field."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_on_ranks, upload_directory
from lm.config import ConfigError, DataConfig, ModelConfig

# llama3-style: grouped-query attention, Llama 3.1's RoPE scaling and an untied head, as Llama 3.1 8B has
# them, saved in shards with an index, as save_pretrained writes models over its max_shard_size.
HF_KINDS = ("gpt2", "gpt2-exact-gelu", "llama", "llama-untied", "llama3-style", "mistral", "qwen2")


# ChatML without a default system prompt: a question and its answer fit the test models' 64 positions.
SHORT_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Llama 3.1's scaling with a pretraining context of 16 positions, so the test's 64 cover every band.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def save_hf_model(kind: str, directory, tokenizer, vocab_size: int, seed: int = 0):
    """A Hugging Face model built from a config (random weights, no download), saved with its tokenizer;
    llama3-style's adds BOS to a text, as Llama 3's does (a special token in a row past the others)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "llama3-style":
        tokenizer = with_bos(tokenizer, "<|begin_of_text|>")
        vocab_size += 64
    if kind.startswith("gpt2"):
        config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.eot_id,
                                         activation_function="gelu" if kind == "gpt2-exact-gelu" else "gelu_new")
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "mistral":  # Llama's architecture under another name, with grouped-query attention
        config = transformers.MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                            max_position_embeddings=64, rope_theta=1e6, sliding_window=None,
                                            tie_word_embeddings=False, eos_token_id=tokenizer.eot_id)
        model = transformers.MistralForCausalLM(config)
    elif kind == "qwen2":  # Llama's architecture with query/key/value biases
        config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=True,
                                          eos_token_id=tokenizer.eot_id)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # Hugging Face initializes biases to zero: make them matter
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_(0, 0.5)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2 if kind == "llama3-style" else 4,
                                          max_position_embeddings=64, rope_theta=500000.0,
                                          rope_scaling=LLAMA3_ROPE if kind == "llama3-style" else None,
                                          tie_word_embeddings=kind not in ("llama-untied", "llama3-style"),
                                          eos_token_id=tokenizer.eot_id)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="100KB" if kind == "llama3-style" else "5GB")
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return model.eval()


def with_bos(tokenizer, bos: str):
    """A copy of a BPE tokenizer that puts `bos` before every text it encodes with special tokens."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    from lm.tokenizer import ByteBPETokenizer

    copy = HFTokenizer.from_str(tokenizer.to_json())
    copy.add_special_tokens([bos])
    copy.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, copy.token_to_id(bos))])
    return ByteBPETokenizer(copy)


def our_model(init_from: str):
    from lm.model import GPT
    from lm.pretrained import inspect_pretrained
    from lm.trainer import load_pretrained

    source = inspect_pretrained(init_from)
    model = GPT(source.model)
    load_pretrained(model, init_from)
    return model.eval(), source


@pytest.fixture(scope="module")
def hf_dirs(prepared_tiny, tmp_path_factory):
    prepared, vocab = prepared_tiny
    root = tmp_path_factory.mktemp("hf")
    models = {kind: save_hf_model(kind, root / kind, prepared.tokenizer(), vocab) for kind in HF_KINDS}
    return root, models


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hugging_face_directory_loads_with_transformers_logits(hf_dirs, prepared_tiny, kind):
    root, models = hf_dirs
    ours, source = our_model(str(root / kind))
    assert source.kind == "hf" and source.model.tie_embeddings == (kind not in ("llama-untied", "llama3-style",
                                                                                "mistral"))
    assert source.model.activation == ("gelu" if kind == "gpt2-exact-gelu" else "gelu_tanh")
    assert source.model.n_kv_head == {"llama3-style": 2, "mistral": 1, "qwen2": 2}.get(kind)
    assert source.model.qkv_bias == (True if kind == "qwen2" else None)
    assert source.model.rope_scaling.type == ("llama3" if kind == "llama3-style" else "none")
    assert (root / kind / "model.safetensors.index.json").exists() == (kind == "llama3-style")
    ids = torch.tensor([prepared_tiny[0].tokenizer().encode("def walk(self, path):\n    return path")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], models[kind](ids).logits, rtol=1e-5, atol=1e-5)
    assert source.tokenizer().encode("return x") == prepared_tiny[0].tokenizer().encode("return x")


def test_generate_and_evaluate_take_a_hugging_face_directory(hf_dirs, corpus_file, tmp_path, capsys):
    """A pretrained model sampled and scored from a terminal before fine-tuning: the same ids as
    transformers' greedy decoding, and the loss transformers computes on the same windows."""
    from launcher.evaluate import main as evaluate
    from launcher.generate import main as generate

    root, models = hf_dirs
    directory, theirs = root / "llama3-style", models["llama3-style"]
    generate([str(directory), "--prompt", "def walk(self):", "--max-tokens", "8", "--temperature", "0"])
    text = capsys.readouterr().out.split("-" * 60)[0].rstrip("\n")
    tokenizer = our_model(str(directory))[1].tokenizer()
    prompt = tokenizer.encode("def walk(self):", add_special_tokens=True)  # as transformers' tokenizer(text): BOS first
    assert prompt[0] == tokenizer.encode("<|begin_of_text|>")[0]
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert text == "def walk(self):" + tokenizer.decode(expected.tolist())
    evaluate([str(directory), "--data", str(corpus_file), "--max-tokens", "100", "--context", "32",
              "--json", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    ids = torch.tensor(tokenizer.encode(corpus_file.read_text(), add_special_tokens=True)[:101])
    losses = [torch.nn.functional.cross_entropy(theirs(ids[None, s:s + 32]).logits[0, :len(ids[s + 1:s + 33])],
                                                ids[s + 1:s + 33], reduction="sum").item() for s in range(0, 100, 32)]
    assert scores["tokens"] == 100 and scores["loss"] == pytest.approx(sum(losses) / 100, rel=1e-4)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate([str(directory), "--data", str(corpus_file), "--context", "65"])
    assert capsys.readouterr().err.strip() == "error: --context 65 exceeds the model's context (64)"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "odd" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        generate([str(tmp_path / "odd")])
    assert capsys.readouterr().err.strip() == (f"error: '{tmp_path / 'odd'}': config.json model_type='bert' is not "
                                               "supported: gpt2, llama, mistral or qwen2")


def test_generate_chats_with_the_models_own_template(hf_dirs, tmp_path, capsys):
    """`--chat`: the reply transformers' greedy decoding gives to its own `apply_chat_template` prompt."""
    import shutil

    from transformers import AutoTokenizer

    from launcher.generate import main as generate

    root, models = hf_dirs
    directory = tmp_path / "qwen2-instruct"
    shutil.copytree(root / "qwen2", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 "chat_template": SHORT_CHATML}))
    generate([str(directory), "--chat", "Capital of Foo?", "--max-tokens", "8", "--temperature", "0"])
    reply = capsys.readouterr().out.split("-" * 60)[0].rstrip("\n")
    theirs = AutoTokenizer.from_pretrained(directory)
    text = theirs.apply_chat_template([{"role": "user", "content": "Capital of Foo?"}], tokenize=False,
                                      add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    prompt = theirs.encode(text, add_special_tokens=False)
    expected = models["qwen2"].generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                        eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert reply == theirs.decode(expected.tolist()).split("<|im_end|>")[0]


def test_a_hugging_face_directory_is_served_as_it_is(hf_dirs, tmp_path):
    """serve.export_dir may name a Hugging Face directory, as `vllm serve <dir>` takes one: named for
    itself, its context known before any replica starts, served in fp32 with transformers' greedy
    tokens, its own chat template and its generation_config.json's sampling values as the defaults of
    requests (vLLM's --generation-config auto); a directory that is neither is one line naming the setting."""
    import shutil

    from launcher.serve_app import served_model
    from launcher.serve_model import LanguageModel, hf_serving_dtype
    from lm.engine import SamplingParams
    from test_chat_template import CHATML

    root, models = hf_dirs
    directory = tmp_path / "llama3-instruct"
    shutil.copytree(root / "llama3-style", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps({**generation, "do_sample": True, "temperature": 0.6,
                                                                  "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}))
    assert served_model(str(directory)) == ("llama3-instruct", 64)
    replica = LanguageModel.func_or_class(str(directory), 2, 1)
    assert replica.info()["precision"] == "fp32" and replica.tokenizer_info()["chat_template"] == CHATML
    defaults = replica.info()["sampling_defaults"]
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}  # top_k 0: transformers' "off"
    # serve.generation_config: none leaves the API's defaults; a directory's file replaces the model's
    own = tmp_path / "house-defaults"
    own.mkdir()
    (own / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "max_new_tokens": 99}))
    for setting, expected_defaults in (("none", {}), (str(own), {"temperature": 0.3})):
        other = LanguageModel.func_or_class(str(directory), 2, 1, generation_config=setting)
        assert other.info()["sampling_defaults"] == expected_defaults
    from launcher.serve_app import check_generation_config

    check_generation_config(str(own))
    with pytest.raises(ConfigError, match=rf"^serve.generation_config='{tmp_path}' is invalid: allowed are auto "):
        check_generation_config(str(tmp_path))
    from launcher.openai_protocol import sampling_params

    taken = sampling_params({"prompt": "x"}, 64, None, defaults)
    assert (taken.temperature, taken.top_p, taken.top_k, taken.repetition_penalty) == (0.6, 0.9, None, 1.1)
    overridden = sampling_params({"prompt": "x", "temperature": 0, "top_p": None}, 64, None, defaults)
    assert (overridden.temperature, overridden.top_p) == (0, 0.9)  # null: the default
    prompt = replica.tokenize("def walk(self):")  # BOS first, as transformers' tokenizer(text)
    assert prompt[0] == replica.tokenize("<|begin_of_text|>", add_special_tokens=False)[0]
    served = replica.engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].output_ids
    expected = models["llama3-style"].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                               min_new_tokens=6, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert served == expected.tolist()
    # serve.dtype: bf16 weights and caches on request (auto is fp32 on a CPU); the greedy tokens of a
    # 2-layer model barely move
    assert hf_serving_dtype(str(directory), "auto", use_gpu=False) == "fp32"
    (directory / "config.json").write_text(json.dumps({**json.loads((directory / "config.json").read_text()),
                                                        "dtype": "bfloat16"}))
    assert hf_serving_dtype(str(directory), "auto", use_gpu=True) == "bf16"
    half = LanguageModel.func_or_class(str(directory), 2, 1, dtype="bf16")
    assert half.info()["precision"] == "bf16" and half.engine.k_caches[0].dtype == torch.bfloat16
    assert half.engine.model.wte.weight.dtype == torch.bfloat16
    assert len(half.engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].output_ids) == 6
    with pytest.raises(ConfigError, match=rf"^serve.export_dir='{tmp_path}' has no config.json; allowed: a "
                                          "directory written by launcher.export, or a Hugging Face"):
        served_model(str(tmp_path))


def test_evaluate_scores_the_answers_of_conversations(hf_dirs, tmp_path, capsys):
    """`launcher.evaluate --chat`: the loss transformers' model gives each conversation's answer tokens,
    rendered with the directory's chat template, the prompts unscored; bad lines skipped and reported."""
    import shutil

    from launcher.evaluate import main as evaluate
    from lm.chat_data import tokenize_conversation
    from lm.tokenizer import hf_directory_tokenizer

    root, models = hf_dirs
    directory = tmp_path / "qwen2-chat"
    shutil.copytree(root / "qwen2", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": SHORT_CHATML}))
    pairs = [(f"Capital of {q.split()[-1]}", a) for q, a in qa_pairs(6)]  # whole in the 64 positions
    write_chats(tmp_path / "chats.jsonl", pairs, extra_lines=["{not json"])
    evaluate([str(directory), "--chat", "--data", str(tmp_path / "chats.jsonl"), "--json", str(tmp_path / "s.json")])
    assert "skipped 1 bad lines: chats.jsonl:7 (invalid JSON)" in capsys.readouterr().err
    scores = json.loads((tmp_path / "s.json").read_text())
    tokenizer = hf_directory_tokenizer(directory)
    loss_sum, answers = 0.0, 0
    for question, answer in pairs:
        ids, mask = tokenize_conversation(tokenizer, [{"role": "user", "content": question},
                                                      {"role": "assistant", "content": answer}], tokenizer.chat_template)
        assert tokenizer.decode(ids).startswith(f"<|im_start|>user\n{question}")
        keep = torch.tensor(mask[1:])
        with torch.no_grad():
            logits = models["qwen2"](torch.tensor([ids[:-1]])).logits[0]
        loss_sum += torch.nn.functional.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum").item()
        answers += int(keep.sum())
    assert (scores["tokens"], scores["conversations"], scores["bad_lines"]) == (answers, 6, 1)
    assert scores["loss"] == pytest.approx(loss_sum / answers, rel=1e-4)
    # Conversations longer than the window: each answer token is still scored once.
    evaluate([str(directory), "--chat", "--data", str(tmp_path / "chats.jsonl"), "--context", "8",
              "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["tokens"] == answers


def test_our_export_round_trips_through_init_from(trained, tmp_path, s3_storage):
    from lm.export import export_checkpoint, load_export
    from lm.pretrained import inspect_pretrained

    root, checkpoints, prepared = trained
    export_checkpoint(checkpoints["llama-gqa-zero2"], tmp_path / "export", "fp32", prepared.tokens("val"))
    exported, tokenizer, cfg, _ = load_export(tmp_path / "export")
    in_bucket = upload_directory(tmp_path / "export", f"{s3_storage}/run/exports/fp32-step000010")
    for init_from in (str(tmp_path / "export"), in_bucket):  # a path, or a URI mirrored first
        ours, source = our_model(init_from)
        assert source.kind == "export" and source.model == cfg
        ids = torch.tensor([tokenizer.encode("import os\nprint(os.getcwd())\n")])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids)[0], exported(ids)[0], rtol=0, atol=0)
    with pytest.raises(ConfigError, match=f"^trainer.init_from='{s3_storage}/nothing' does not exist"):
        inspect_pretrained(f"{s3_storage}/nothing")


def test_hub_ids_and_unusable_directories_are_refused(tmp_path, hf_dirs):
    from lm.pretrained import inspect_pretrained

    for hub_id in ("gpt2", "meta-llama/Llama-3.2-1B"):
        with pytest.raises(ConfigError, match=r"trainer.init_from=.*hub id.*never downloads.*local"):
            inspect_pretrained(hub_id)
    with pytest.raises(ConfigError, match="trainer.init_from=.*no config.json"):
        inspect_pretrained(str(tmp_path))
    root, _ = hf_dirs
    config = json.loads((root / "llama" / "config.json").read_text())
    for name, change, message in (
            ("uneven-groups", {"num_key_value_heads": 3}, "num_key_value_heads=3 is not supported: a divisor of "
                                                          "num_attention_heads=4"),
            ("yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}},
             "rope_parameters.rope_type='yarn' is not supported: default .plain RoPE., llama3 or linear"),
            ("windowed", {"model_type": "mistral", "sliding_window": 16},
             r"sliding_window=16 is not supported: null \(attention over the whole context\)"),
            ("no-weights", {}, "no weights: the directory needs model.safetensors or pytorch_model.bin, or their "
                               "sharded form")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **change}))
        if name != "no-weights":
            (tmp_path / name / "model.safetensors").write_bytes((root / "llama" / "model.safetensors").read_bytes())
        with pytest.raises(ConfigError, match=message):
            inspect_pretrained(str(tmp_path / name))
    sharded = tmp_path / "missing-shard"  # an index whose shard did not arrive (an interrupted copy)
    sharded.mkdir()
    for file in (root / "llama3-style").iterdir():
        (sharded / file.name).write_bytes(file.read_bytes())
    lost = sorted(sharded.glob("model-*.safetensors"))[-1]
    lost.unlink()
    with pytest.raises(ConfigError, match=f"model.safetensors.index.json lists shards that are not in the directory: "
                                          f"{lost.name}$"):
        inspect_pretrained(str(sharded))


def test_overrides_that_contradict_the_checkpoint_name_the_field(hf_dirs):
    from launcher.train import explicit_model_fields
    from lm.pretrained import apply_pretrained_architecture, inspect_pretrained

    root, _ = hf_dirs
    source = inspect_pretrained(str(root / "gpt2"))
    with pytest.raises(ConfigError, match=r"model.n_embd=128 contradicts trainer.init_from=.*n_embd=64"):
        apply_pretrained_architecture(ModelConfig(n_embd=128), source, explicit_model_fields(["model.n_embd=128"]))
    with pytest.raises(ConfigError, match=r"model.variant='llama' contradicts"):
        apply_pretrained_architecture(ModelConfig(variant="llama"), source, explicit_model_fields(["model=llama-small"]))
    # Run settings may differ; the architecture comes from the checkpoint.
    merged = apply_pretrained_architecture(ModelConfig(n_embd=384, dropout=0.1, name="mine"), source,
                                           explicit_model_fields(["model.dropout=0.1", "model.name=mine"]))
    assert (merged.n_embd, merged.dropout, merged.name, merged.vocab_size) == (64, 0.1, "mine", source.model.vocab_size)


def qa_pairs(n: int) -> list[tuple[str, str]]:
    """Made-up countries and capitals: nothing a model could know, only learn."""
    import random

    rng = random.Random(7)
    syllables = ["ka", "lo", "mi", "ren", "tu", "vor", "zan", "pel", "dri", "os", "qua", "bel", "nix", "ta"]
    words = set()
    while len(words) < 2 * n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize())
    words = sorted(words)
    rng.shuffle(words)
    return [(f"What is the capital of {words[2 * i]}?", f"{words[2 * i + 1]}.") for i in range(n)]


def write_chats(path, pairs, extra_lines=()) -> None:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             if i % 2 else json.dumps({"prompt": q, "completion": a}) for i, (q, a) in enumerate(pairs)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")


def test_prompt_tokens_carry_no_loss(prepared_tiny):
    from lm.chat_data import tokenize_conversation
    from lm.shard_loader import TokenShardLoader
    from lm.model import GPT

    tokenizer = prepared_tiny[0].tokenizer()
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of Foo?"},
                {"role": "assistant", "content": "Bar."}, {"role": "user", "content": "And of Baz?"},
                {"role": "assistant", "content": "Qux."}]
    ids, mask = tokenize_conversation(tokenizer, messages)
    assert tokenizer.decode(ids) == "".join(f"<|{m['role']}|>\n{m['content']}\n<|end|>\n" for m in messages)
    answers = [i for i, keep in zip(ids, mask) if keep]
    assert tokenizer.decode(answers) == "Bar.\n<|end|>Qux.\n<|end|>"

    import numpy as np

    loader = TokenShardLoader(np.array(ids + [0], dtype=np.int64), len(ids), 1, 0, 1, 0,
                              loss_mask=np.array(mask + [0], dtype=np.uint8))
    x, y = loader.next_batch()
    assert tokenizer.decode([t for t in y[0].tolist() if t != -100]) == "Bar.\n<|end|>Qux.\n<|end|>"
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=len(ids), vocab_size=prepared_tiny[1]))
    logits, loss = model.eval()(x, y)
    counted = y[0] != -100
    expected = torch.nn.functional.cross_entropy(logits[0][counted], y[0][counted])
    torch.testing.assert_close(loss, expected)
    _, training_loss = model.train()(x, y)  # computed without the logits (lm.head_loss)
    torch.testing.assert_close(training_loss, expected)


def test_bad_chat_lines_are_reported_by_line_number(tmp_path, capsys):
    from lm.data import prepare_data

    path = tmp_path / "chats.jsonl"
    write_chats(path, qa_pairs(30), extra_lines=["{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    data = DataConfig(name="chat", source="chat", path=str(path), vocab_size=300, cache_dir=str(tmp_path / "cache"),
                      max_bad_fraction=0.1)
    prepare_data(data, progress=False, seq_len=32)
    assert "skipped 2 bad lines of 32: chats.jsonl:31 (invalid JSON), chats.jsonl:32 (no non-empty assistant" \
        in capsys.readouterr().err
    data.max_bad_fraction = 0.05
    with pytest.raises(ConfigError, match=r"data.path=.*2 of 32 lines are bad, more than data.max_bad_fraction=0.05: "
                                          r"chats.jsonl:31 \(invalid JSON\)"):
        prepare_data(data, progress=False, seq_len=32)


def test_chats_in_parquet_and_arrow_read_as_their_jsonl(tmp_path):
    """A Hugging Face chat dataset's Parquet or Arrow file: `messages` is a list of {role, content} structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lm.data import prepare_data

    pairs = qa_pairs(20)
    write_chats(tmp_path / "chats.jsonl", pairs)
    rows = [json.loads(line) for line in (tmp_path / "chats.jsonl").read_text().splitlines()]
    conversations = [r.get("messages") or [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["completion"]}] for r in rows]
    table = pa.table({"messages": conversations, "source": ["made up"] * len(rows)})
    pq.write_table(table, tmp_path / "chats.parquet")
    with pa.ipc.new_stream(str(tmp_path / "chats.arrow"), table.schema) as writer:
        writer.write_table(table)
    prepared = {}
    for name in ("chats.jsonl", "chats.parquet", "chats.arrow"):
        data = DataConfig(name="chat", source="chat", path=str(tmp_path / name), vocab_size=300,
                          cache_dir=str(tmp_path / "cache"))
        prepared[name] = prepare_data(data, progress=False, seq_len=32)
    assert len({p.directory for p in prepared.values()}) == 1, "the same conversations, so the same token cache"


def test_sharegpt_and_alpaca_records_read_as_messages(tmp_path):
    """The layouts chat datasets come in: OpenAI's messages, ShareGPT's conversations (from/value, or
    role/content), prompt + completion, Alpaca's instruction (+ input) + output; a record in none of them,
    or with an unknown speaker, is a bad line that says what it needs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lm.chat_data import iter_conversations

    system, question, answer = "Be terse.", "Capital of Foo?", "Bar."
    expected = [{"role": "system", "content": system}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
    sharegpt = [{"from": "system", "value": system}, {"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    records = [{"messages": expected}, {"conversations": sharegpt}, {"conversations": expected},
               {"prompt": question, "completion": answer}, {"instruction": question, "input": "", "output": answer},
               {"instruction": "Capital of", "input": "Foo?", "output": answer},
               {"conversations": [{"from": "human", "value": question}, {"from": "tool", "value": "{}"}]},
               {"question": question, "answer": answer}]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    bad = []
    conversations = list(iter_conversations([tmp_path / "chats.jsonl"], bad))
    assert conversations[:3] == [expected] * 3
    assert conversations[3:5] == [expected[1:]] * 2
    assert conversations[5] == [{"role": "user", "content": "Capital of\n\nFoo?"}, expected[2]]
    assert [(b.lineno, b.reason) for b in bad] == [
        (7, "each of conversations needs role in system/user/assistant/tool (or from: system/human/user/gpt/assistant) "
            "and string content"),
        (8, 'needs "messages" (or ShareGPT\'s "conversations"), "prompt" and "completion", or "instruction" and '
            '"output"')]
    pq.write_table(pa.table({"conversations": [sharegpt] * 2, "id": ["a", "b"]}), tmp_path / "sharegpt.parquet")
    assert list(iter_conversations([tmp_path / "sharegpt.parquet"], [])) == [expected] * 2


def test_val_path_holds_out_its_own_conversations(tmp_path):
    from lm.data import prepare_data

    pairs = qa_pairs(12)
    write_chats(tmp_path / "train.jsonl", pairs[:10])
    write_chats(tmp_path / "val.jsonl", pairs[10:])
    data = DataConfig(name="chat", source="chat", path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"),
                      vocab_size=300, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(data, progress=False, seq_len=32)
    tokenizer = prepared.tokenizer()
    train_text, val_text = (tokenizer.decode(prepared.tokens(s).tolist()) for s in ("train", "val"))
    assert all(q in train_text and q not in val_text for q, _ in pairs[:10]), "all of data.path trains"
    assert all(q in val_text and q not in train_text for q, _ in pairs[10:]), "validation is val_path's"
    write_chats(tmp_path / "bad.jsonl", [], extra_lines=["{not json"])
    data.val_path = str(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match=r"^data.val_path=.*bad.jsonl.*1 of 1 lines are bad"):
        prepare_data(data, progress=False, seq_len=32)


def finetune_runs(rank, runs, cfg_dict, dataset_dir, root):
    """Each run: (HF dir, ZeRO stage) for 20 steps; returns the logged train losses per run."""
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    losses = {}
    for name, (init_from, stage) in runs.items():
        cfg = config_from_dict(cfg_dict)
        cfg.trainer.init_from, cfg.deepspeed.zero_stage, cfg.run.name = init_from, stage, name
        from lm.pretrained import inspect_pretrained

        cfg.model = inspect_pretrained(init_from).model
        logged = []
        train(cfg, dataset_dir, local_hooks(f"{root}/{name}", rank, keep=1,
                                            log=lambda m, s: "train_loss" in m and logged.append(m["train_loss"])))
        losses[name] = logged
    return losses


def test_zero2_and_zero3_fine_tunes_start_from_the_weights_and_lower_the_loss(hf_dirs, tiny_train_config, tmp_path,
                                                                                s3_storage):
    from lm.config import config_to_dict
    from lm.data import prepare_data
    from lm.shard_loader import TokenShardLoader
    from lm.pretrained import inspect_pretrained

    root, models = hf_dirs
    chats = tmp_path / "chats.jsonl"
    write_chats(chats, qa_pairs(60))
    cfg = tiny_train_config(max_steps=20, log_every=1, eval_every=20, ckpt_every=20, micro_batch_size=4, grad_accum=1)
    cfg.data = DataConfig(name="chat", source="chat", path=str(chats), cache_dir=str(tmp_path / "cache"))
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 2
    cfg.trainer.init_from = str(root / "gpt2")
    prepared = prepare_data(cfg.data, progress=False, tokenizer=inspect_pretrained(cfg.trainer.init_from).tokenizer(),
                            seq_len=64)
    # The Llama model (grouped-query, RoPE scaled, untied, in shards) from a bucket: both ranks mirror
    # it (one downloads, the other waits for it).
    llama = upload_directory(root / "llama3-style", f"{s3_storage}/hf/llama3-style")
    runs = {"gpt2-zero2": (str(root / "gpt2"), 2), "gpt2-zero3": (str(root / "gpt2"), 3), "llama-zero3": (llama, 3)}
    losses = run_on_ranks(finetune_runs, 2, runs, config_to_dict(cfg), str(prepared.directory), str(tmp_path),
                          tmp_path=tmp_path)[0]
    for name, (init_from, _) in runs.items():
        # Step 1's loss is the pretrained model's own loss on the first batch of both ranks.
        kind = os.path.basename(init_from)
        first = []
        for rank in range(2):
            loader = TokenShardLoader(prepared.tokens("train"), 64, 4, rank, 2, cfg.trainer.seed,
                                      loss_mask=prepared.loss_mask("train"))
            x, y = loader.next_batch()
            with torch.no_grad():
                logits = models[kind](x).logits
            first.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
        assert losses[name][0] == pytest.approx(sum(first) / 2, rel=1e-4), name
        assert len(losses[name]) == 20 and sum(losses[name][-3:]) / 3 < 0.7 * losses[name][0], (name, losses[name])


@pytest.mark.parametrize("override,message", [
    ("model.n_embd=128", "config error: model.n_embd=128 contradicts trainer.init_from="),
    ("trainer.init_from=gpt2", "config error: trainer.init_from='gpt2' is not a local directory (it looks like a "
                               "Hugging Face hub id"),
])
def test_command_line_errors_are_one_line(hf_dirs, tmp_path, override, message):
    root, _ = hf_dirs
    chats = tmp_path / "chats.jsonl"
    write_chats(chats, qa_pairs(10))
    result = subprocess.run(
        [sys.executable, "-m", "launcher.train", "experiment=finetune", f"trainer.init_from={root / 'gpt2'}",
         "data=chat", f"data.path={chats}", f"run.storage={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache",
         override], cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
