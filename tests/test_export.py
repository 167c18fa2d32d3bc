"""Export: checkpoints of any ZeRO stage consolidate to the same weights; the Hugging Face copy
gives transformers the same logits; int8 and bf16 pass the perplexity gate on a trained model,
a sabotaged artifact does not; bad checkpoints fail with one line and nothing written."""

import json
import re
import os
import subprocess
import sys

import pytest
import torch

import lm.export as export_module
from conftest import REPO
from lm.chat_template import render_chat
from lm.export import ExportQualityError, export_checkpoint, load_export

def test_zero0_and_zero3_checkpoints_export_the_same_weights(trained, tmp_path):
    root, checkpoints, prepared = trained
    val = prepared.tokens("val")
    for name in ("gpt2-zero0", "gpt2-zero3"):
        export_checkpoint(checkpoints[name], tmp_path / name, "fp32", val)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "gpt2-zero0" / "model.safetensors")), load_file(str(tmp_path / "gpt2-zero3" / "model.safetensors"))
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    for key in a:
        # Training itself differs by reduction order between the stages (see test_deepspeed_parity).
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,hf_class", [("gpt2-trained", "GPT2LMHeadModel"), ("llama-gqa-zero2", "LlamaForCausalLM")])
def test_hugging_face_copy_loads_in_transformers_with_equal_logits(trained, tmp_path, name, hf_class):
    import transformers

    root, checkpoints, prepared = trained
    out = tmp_path / name
    export_checkpoint(checkpoints[name], out, "fp32", prepared.tokens("val"))
    ours, tokenizer, cfg, _ = load_export(out)
    theirs = getattr(transformers, hf_class).from_pretrained(out / "hf").eval()
    if hf_class == "LlamaForCausalLM":  # grouped-query: one key/value head for two query heads
        assert theirs.config.num_key_value_heads == cfg.n_kv_head == 1
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    text = "def walk(self, path):\n    return os.path.join(path, 'x')\n"
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id == theirs.config.eos_token_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A loop?"}]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chat(messages)
    with torch.no_grad():
        expected = ours(torch.tensor([ids]))[0]
        got = theirs(torch.tensor([ids])).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_exports_pass_the_perplexity_gate(trained, tmp_path, precision):
    root, checkpoints, prepared = trained
    report = export_checkpoint(checkpoints["gpt2-trained"], tmp_path / precision, precision, prepared.tokens("val"))
    assert report["val_perplexity_fp32"] < 0.2 * 512, "trained: far below a uniform guess over 512 tokens"
    assert abs(report["ppl_increase"]) <= 0.02 and not report["forced"]
    assert json.loads((tmp_path / precision / "export.json").read_text()) == report
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / precision / "model.safetensors"))
    expected = torch.int8 if precision == "int8" else torch.bfloat16
    assert stored["h.0.attn.c_attn.weight"].dtype == expected
    model, _, _, loaded_precision = load_export(tmp_path / precision)
    assert loaded_precision == precision
    if precision == "int8":  # served (and gated) as int8 matmuls, the output head included
        from lm.inference import Int8Linear

        assert isinstance(model.h[0].attn.c_attn, Int8Linear) and isinstance(model.lm_head, Int8Linear)


def test_a_sabotaged_artifact_fails_the_gate_and_nothing_is_written(trained, tmp_path, monkeypatch):
    root, checkpoints, prepared = trained
    real = export_module.quantize_int8

    def sabotaged(weight):
        q, scale = real(weight)
        return q, scale * 3.0  # every quantized matrix comes back three times too large


    monkeypatch.setattr(export_module, "quantize_int8", sabotaged)
    with pytest.raises(ExportQualityError, match=r"export.precision=int8: validation perplexity rose"):
        export_checkpoint(checkpoints["gpt2-trained"], tmp_path / "bad", "int8", prepared.tokens("val"))
    assert list(tmp_path.iterdir()) == []
    forced = export_checkpoint(checkpoints["gpt2-trained"], tmp_path / "forced", "int8", prepared.tokens("val"), force=True)
    assert forced["forced"] and forced["ppl_increase"] > 0.02


def run_export(cwd, *overrides):
    return subprocess.run([sys.executable, "-m", "launcher.export", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_export_cli_writes_the_newest_runs_export(trained, tmp_path):
    root, checkpoints, _ = trained
    result = run_export(tmp_path, f"run.storage={root}", "run.name=gpt2-trained", "export.precision=int8")
    assert result.returncode == 0, result.stderr[-2000:]
    out = root / "gpt2-trained" / "exports" / "int8-step000300"
    assert f"export: {out}" in result.stdout and (out / "export.json").exists()


def test_export_of_a_missing_or_corrupt_checkpoint_is_one_line_and_writes_nothing(trained, tmp_path):
    root, checkpoints, _ = trained
    missing = run_export(tmp_path, f"run.storage={root}", "run.name=nope")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"config error: run.name='nope' has no run directory under run.storage='{root}'"]

    import shutil

    corrupt_run = tmp_path / "runs" / "corrupt"
    shutil.copytree(checkpoints["gpt2-zero0"], corrupt_run / "checkpoint_000005")
    shard = corrupt_run / "checkpoint_000005" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:1000])  # cut short: its rank's manifest says otherwise
    bad = run_export(tmp_path, f"run.storage={tmp_path}/runs", "run.name=corrupt")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "no complete training checkpoint" in lines[0], bad.stderr[-2000:]
    shard.write_bytes(data[:1000] + bytes(len(data) - 1000))  # full size, unreadable
    bad = run_export(tmp_path, f"run.storage={tmp_path}/runs", "run.name=corrupt")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "is corrupt" in lines[0], bad.stderr[-2000:]
    assert not (corrupt_run / "exports").exists()

    # Settings that cannot be honoured, before the checkpoint is read: a typo'd key, no batches to
    # measure the gate on, a NaN tolerance (which every artifact would pass)
    typo = run_export(tmp_path, f"run.storage={root}", "run.name=gpt2-trained", "export.precison=int8")
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "config error: export.precison is not a config key (did you mean export.precision?): export's keys are "
        "precision, max_ppl_increase, force, eval_batches, checkpoint"]
    from launcher.export import export_run
    from lm.config import ConfigError, ExportAppConfig, ExportConfig, RunConfig

    for setting, message in (({"eval_batches": 0}, "export.eval_batches=0 is invalid: must be an integer >= 1"),
                             ({"max_ppl_increase": float("nan")}, "export.max_ppl_increase=nan is invalid: must be a")):
        with pytest.raises(ConfigError) as error:
            export_run(ExportAppConfig(run=RunConfig(name="gpt2-trained", storage=str(root)),
                                       export=ExportConfig(**setting)))
        assert str(error.value).startswith(message)


def test_evaluate_cli_scores_held_out_text_with_the_models_own_tokenizer(trained, corpus_file, tmp_path, capsys):
    from launcher.evaluate import main
    from lm.checkpoint import load_model
    from lm.evaluation import evaluate_stream

    root, checkpoints, prepared = trained
    checkpoint = checkpoints["gpt2-trained"]
    export_checkpoint(checkpoint, tmp_path / "e", "fp32", prepared.tokens("val"))
    scores = {}
    for name, source in (("checkpoint", checkpoint), ("export", tmp_path / "e")):
        main([str(source), "--data", str(corpus_file), "--max-tokens", "600", "--json", str(tmp_path / f"{name}.json")])
        assert "600 tokens of 1 document:" in capsys.readouterr().out
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    model, tokenizer, _ = load_model(checkpoint)
    tokens = tokenizer.encode(corpus_file.read_text())
    direct = evaluate_stream(model.eval(), torch.tensor(tokens).numpy(), model.cfg.block_size, max_tokens=600)
    assert scores["checkpoint"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert scores["export"]["loss"] == pytest.approx(direct["loss"], rel=1e-4), "the fp32 export scores as its checkpoint"
    assert direct["loss"] < 0.8 * torch.log(torch.tensor(float(model.cfg.vocab_size))).item(), "a trained model beats uniform"
    assert 0 < direct["accuracy"] < 1 and direct["perplexity"] == pytest.approx(torch.exp(torch.tensor(direct["loss"])).item())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), "--data", str(tmp_path / "missing.txt")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --data '{tmp_path / 'missing.txt'}' does not exist: pass existing files, directories or globs"
    held_out = tmp_path / "held_out"  # a directory of mostly unread files: said once, with the flag
    held_out.mkdir()
    (held_out / "notes.txt").write_text(corpus_file.read_text()[:2000])
    for name in ("a.py", "b.py"):
        (held_out / name).write_text("x = 1\n")
    main([str(checkpoint), "--data", str(held_out), "--max-tokens", "100"])
    assert capsys.readouterr().err.splitlines()[0] == (
        f"data: --data item '{held_out}': 1 of its files are read (.txt, .md, .jsonl, .parquet, .arrow), not its "
        f"2 .py files: name them with a glob to read them as text, e.g. '{held_out}/**/*.py'")
    (tmp_path / "held_out.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--data", str(tmp_path / "held_out.jsonl")])
    assert capsys.readouterr().err.strip() == (f"error: --text-field 'text': {tmp_path / 'held_out.jsonl'}:1 has no such "
                                               "field; its fields: body (strings: body); set --text-field body")
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n')
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--data", str(tmp_path / "blank.jsonl")])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: --data '{tmp_path / 'blank.jsonl'}': the corpus is empty (1 files, no text)")
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--data", str(tmp_path / "blank.jsonl"), "--batch-size", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --batch-size 0: must be >= 1")


def test_generate_cli_samples_from_an_export_or_a_checkpoint(trained, tmp_path, capsys):
    from launcher.generate import main

    root, checkpoints, prepared = trained
    export_checkpoint(checkpoints["gpt2-trained"], tmp_path / "e", "bf16", prepared.tokens("val"))
    for source in (tmp_path / "e", checkpoints["gpt2-trained"]):
        main([str(source), "--prompt", "def ", "--max-tokens", "8", "--num-samples", "2", "--repetition-penalty", "1.2",
              "--min-p", "0.05"])
        samples = [s.lstrip("\n") for s in capsys.readouterr().out.split("-" * 60 + "\n") if s.strip()]
        assert len(samples) == 2 and all(s.startswith("def ") for s in samples)
    main([str(tmp_path / "e"), "--prompt", "def ", "--max-tokens", "8", "--top-k", "0"])  # 0: no top-k
    assert capsys.readouterr().out.lstrip("\n").startswith("def ")
    for flag, value, message in (("--num-samples", "0", "must be >= 1"), ("--top-k", "-1", "must be >= 0 (0: no top-k)")):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "e"), flag, value])
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {flag}={value}: {message}"]
    (tmp_path / "point.json").write_text(json.dumps({"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}}))
    main([str(tmp_path / "e"), "--chat", "A point?", "--max-tokens", "120", "--json-schema", str(tmp_path / "point.json")])
    point = json.loads(capsys.readouterr().out.split("-" * 60)[0])
    assert set(point) == {"x", "y"} and all(isinstance(v, int) for v in point.values())
    main([str(tmp_path / "e"), "--prompt", "On ", "--max-tokens", "20", "--num-samples", "2", "--regex", r"\d{4}-\d\d"])
    dates = [s.strip() for s in capsys.readouterr().out.split("-" * 60) if s.strip()]
    assert len(dates) == 2 and all(re.fullmatch(r"On \d{4}-\d\d", d) for d in dates), dates
    (tmp_path / "bad.json").write_text(json.dumps({"type": "integer", "multipleOf": 2}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "e"), "--json-schema", str(tmp_path / "bad.json")])
    from lm.json_guide import SUPPORTED

    assert capsys.readouterr().err.strip().splitlines() == [  # one line, naming the file and the keyword
        f"error: --json-schema {tmp_path / 'bad.json'}: multipleOf: is not supported in guided decoding; supported: "
        f"{', '.join(SUPPORTED)}"]
    (tmp_path / "answer.gbnf").write_text('root ::= ("yes" | "no") "."\n')
    main([str(tmp_path / "e"), "--prompt", "So: ", "--max-tokens", "8", "--grammar", str(tmp_path / "answer.gbnf")])
    assert capsys.readouterr().out.split("-" * 60)[0].strip() in ("So: yes.", "So: no.")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "e"), "--regex", "(?=a)b"])
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --regex (?=a)b: '(?=' at position 0: lookaround, inline flags and other extensions are not supported"]
