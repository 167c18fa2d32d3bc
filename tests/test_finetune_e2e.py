"""The fine-tuning path a user runs, end to end: `launcher.train experiment=finetune` from a Hugging Face
directory with a chat template of its own (ChatML, as Qwen's) on a made-up Q/A chat set (2 Ray workers,
ZeRO-3), `launcher.export`'s entry point to int8, and the answers served by `python -m launcher.serve`
as `make serve` runs it (the run's newest export; its Prometheus metrics where it says; `serve status`
through the dashboard it starts; Ctrl-C stops it) through `/v1/chat/completions`, with the template the
model was tuned on, which the export hands on to transformers."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

import pytest
import torch
import yaml

from conftest import REPO, free_port, interruptible_popen
from test_chat_template import CHATML
from test_finetune import qa_pairs, write_chats

pytestmark = pytest.mark.slow


def run_module(module: str, *overrides: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def answer_accuracy(model, tokenizer, pairs) -> float:
    """Next-token accuracy on the answer tokens of each conversation, teacher forced."""
    from lm.chat_data import tokenize_conversation

    correct = total = 0
    for question, answer in pairs:
        ids, mask = tokenize_conversation(tokenizer, [{"role": "user", "content": question},
                                                      {"role": "assistant", "content": answer}],
                                          tokenizer.chat_template)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]]))
        predicted, targets, counted = logits[0].argmax(-1), torch.tensor(ids[1:]), torch.tensor(mask[1:])
        correct += int((predicted == targets)[counted].sum())
        total += int(counted.sum())
    return correct / total


def serve_command(*overrides: str, cwd) -> tuple[subprocess.Popen, list[str]]:
    """`python -m launcher.serve` started as `make serve` starts it, and its output up to the line that
    says the API is up."""
    proc = interruptible_popen([sys.executable, "-m", "launcher.serve", *overrides], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    deadline = time.time() + 180
    while time.time() < deadline and not any("OpenAI-compatible API on" in line for line in lines):
        line = proc.stdout.readline()
        assert line, "".join(lines[-30:])
        lines.append(line)
    return proc, lines


def test_finetune_export_and_serve_chat_answers(trained, tmp_path):
    from openai import OpenAI

    from launcher.export import export_run
    from lm.config import ExportAppConfig, ExportConfig, RunConfig
    from lm.chat_data import iter_conversations
    from lm.data import chat_splits
    from lm.export import export_checkpoint, load_export

    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer, GenerationConfig, GPT2LMHeadModel

    root, checkpoints, prepared = trained
    export_checkpoint(checkpoints["gpt2-trained"], tmp_path / "export", "fp32", prepared.tokens("val"))
    # The export's Hugging Face copy, given ChatML as a pretrained model's own template, its markers
    # special tokens, the embedding resized for them (as a model is prepared for ChatML with transformers).
    pretrained = tmp_path / "export" / "hf"
    tokenizer = HFTokenizer.from_file(str(pretrained / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(pretrained / "tokenizer.json"))
    hf_model = GPT2LMHeadModel.from_pretrained(pretrained)
    hf_model.resize_token_embeddings(tokenizer.get_vocab_size(), pad_to_multiple_of=64)
    hf_model.save_pretrained(pretrained)
    config = json.loads((pretrained / "tokenizer_config.json").read_text())
    (pretrained / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML,
                                                                  "eos_token": "<|im_end|>"}))
    generation = json.loads((pretrained / "generation_config.json").read_text())
    (pretrained / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.7, "top_p": 0.8}))
    pairs = qa_pairs(40)
    write_chats(tmp_path / "qa.jsonl", pairs)
    storage = tmp_path / "runs"
    # data.block_size=80: rows of two conversations (~37 tokens each with ChatML's default system prompt)
    run_module("launcher.train", "experiment=finetune", f"trainer.init_from={pretrained}", "data=chat",
               f"data.path={tmp_path / 'qa.jsonl'}", "deepspeed=zero3", "cluster.num_workers=2", "data.block_size=80",
               "data.val_fraction=0.05", "trainer.max_steps=200", "trainer.micro_batch_size=4", "trainer.eval_every=100",
               "trainer.ckpt_every=200", "optim.lr=3e-3", "trainer.sample_tokens=0", "run.name=qa",
               f"run.storage={storage}", f"logging.dir={tmp_path / 'wandb'}", f"data.cache_dir={tmp_path / 'cache'}",
               "cluster.include_dashboard=false",  # 3-5 s a launch on 2 cores; test_train_e2e's Ctrl-C test has it on
               cwd=tmp_path)
    summary = json.loads((storage / "qa" / "summary.json").read_text())
    assert summary["config"]["trainer"]["init_from"] == str(pretrained)
    assert summary["val_accuracy"] is not None  # measured on the held-out conversations' answer tokens

    # launcher.export's own entry point, in-process (its CLI is tested in test_export.py)
    export_dir = export_run(ExportAppConfig(run=RunConfig(name="qa", storage=str(storage)),
                                            export=ExportConfig(precision="int8")))
    model, tokenizer, _, _ = load_export(export_dir)
    template = tokenizer.chat_template
    assert template.source == CHATML and template.end_of_turn == "<|im_end|>"
    # transformers prompts the exported model as it was tuned
    question = [{"role": "user", "content": "What is the capital of Foo?"}]
    assert AutoTokenizer.from_pretrained(os.path.join(export_dir, "hf")).apply_chat_template(
        question, tokenize=False, add_generation_prompt=True) == template.render(question)
    # and its generate() stops where our engine does: at end-of-text and at the reply's <|im_end|>, sampling
    # as the pretrained model did by default
    generation = GenerationConfig.from_pretrained(os.path.join(export_dir, "hf"))
    assert generation.eos_token_id == sorted([tokenizer.eot_id, tokenizer.encode("<|im_end|>")[0]])
    assert (generation.temperature, generation.top_p) == (0.7, 0.8)  # the pretrained model's sampling defaults
    conversations = list(iter_conversations([tmp_path / "qa.jsonl"], [], template))
    trained_on = chat_splits(conversations, 0.05, template)["train"]  # 38 of 40; the other 2 are the val split
    train_pairs = [(c[0]["content"], c[1]["content"]) for c in trained_on]
    assert len(train_pairs) == 38
    assert answer_accuracy(model, tokenizer, train_pairs) >= 0.95

    port, metrics_port = free_port(), free_port()
    proc, lines = serve_command("run.name=qa", f"run.storage={storage}", f"serve.port={port}",
                                f"serve.metrics_port={metrics_port}", cwd=tmp_path)
    try:
        assert f"serving qa from {export_dir}\n" in lines  # the run's newest export
        assert f"OpenAI-compatible API on http://127.0.0.1:{port}/v1 (Ctrl-C stops it)\n" in lines
        assert f"Prometheus metrics (Ray's, Serve's and the engine's ray_lm_*) on http://127.0.0.1:{metrics_port}" \
               "/metrics\n" in lines
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["qa"]
        for question, answer in train_pairs[:4]:
            reply = client.chat.completions.create(model="qa", messages=[{"role": "user", "content": question}],
                                                   max_tokens=16, temperature=0)
            assert reply.choices[0].message.content.strip() == answer, (question, reply.choices[0].message.content)
            assert reply.choices[0].finish_reason == "stop"
        assert "\nray_" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        # Serve's own CLI reads the application's state from the dashboard, as the line printed says
        command = next(line for line in lines if line.startswith("Ray dashboard on http://127.0.0.1:"))
        command = command.split("`")[1].split()
        assert command[:2] == ["serve", "status"]
        status = subprocess.run([os.path.join(os.path.dirname(sys.executable), "serve"), *command[1:]],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr[-3000:]
        deployments = yaml.safe_load(status.stdout)["applications"]["lm"]["deployments"]
        assert deployments["LanguageModel"]["status"] == "HEALTHY"
        assert deployments["LanguageModel"]["replica_states"] == {"RUNNING": 1}

        # `docker stop`, Kubernetes and systemd send SIGTERM: it stops the server as Ctrl-C does (it raises
        # the KeyboardInterrupt a Ctrl-C raises), where Ray's own handler dumped a stack and exited at once.
        # A request in flight (here its body half sent) finishes first, while new requests, /health too, get
        # a 503, so a load balancer stops sending them; Serve's own shutdown would have cut it off.
        question, answer = train_pairs[0]
        body = json.dumps({"model": "qa", "messages": [{"role": "user", "content": question}], "max_tokens": 16,
                           "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as held:
            held.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            time.sleep(2)  # the request reaches the ingress, which reads its body as it comes
            proc.send_signal(signal.SIGTERM)
            stopping = next(line for line in proc.stdout if line.startswith("stopping"))
            assert stopping == "stopping: new requests get a 503; waiting up to 20 s for the 1 in flight " \
                               "(Ctrl-C: stop now)\n"
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 503
            held.sendall(body[10:])
            reply = http.client.HTTPResponse(held)
            reply.begin()
            assert reply.status == 200
            assert json.loads(reply.read())["choices"][0]["message"]["content"].strip() == answer
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in out and "SIGTERM received" not in out, out[-3000:]
        assert "stopping: Ray Serve and its Ray shut down\n" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
