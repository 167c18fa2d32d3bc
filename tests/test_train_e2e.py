"""End to end through `python -m launcher.train` on a real local Ray cluster with DeepSpeed ZeRO-3 workers,
W&B offline and the run in an object store (a local S3 server): a Ctrl-C (as SIGTERM, test_cluster_e2e.py)
checkpoints at the next log step and exits cleanly, rerunning the command on another number of workers
resumes, loss falls, summary.json is complete, the checkpoint loads and reproduces the reported val loss,
W&B holds the metrics of both parts, and the export is served from the bucket. (Multirun sweeps run
through `ray job submit` in test_cluster_e2e.py: the same entry point, with the table, sweep_summary.json
and the shared W&B group checked there; runs on a shared filesystem there and in test_finetune_e2e.py.)"""

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, composed, interruptible_popen, wait_for_checkpoint
from launcher.summary import SUMMARY_KEYS
from wandb_offline import read_run

pytestmark = pytest.mark.slow


def start(cwd: Path, *overrides: str) -> subprocess.Popen:
    return interruptible_popen([sys.executable, "-m", "launcher.train", *overrides], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO)})


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=900)
    if proc.returncode not in (0, 2, 130):
        print(stdout[-5000:], stderr[-5000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def launch(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return finish(start(cwd, *overrides))


def tiny_overrides(tmp_path: Path, corpus_file: Path) -> list[str]:
    """A model slow enough (~0.1 s/step) to be interrupted between checkpoints, fast enough for CI."""
    return ["model=tiny", "model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=64",
            "deepspeed=zero2", "cluster.num_workers=2", "data=text", f"data.path={corpus_file}",
            "data.vocab_size=512", "trainer.micro_batch_size=4", "trainer.eval_every=15", "trainer.ckpt_every=15",
            "trainer.log_every=5", "trainer.sample_tokens=20", f"run.storage={tmp_path}/runs",
            f"logging.dir={tmp_path}/wandb", f"data.cache_dir={tmp_path}/cache"]


def recompute_val_loss(summary: dict, checkpoint: Path) -> float:
    """Evaluate the checkpoint's weights on the same val windows the trainer used (each rank's shard)."""
    from lm.checkpoint import load_model
    from lm.config import config_from_dict, sequence_length
    from lm.data import PreparedData
    from lm.shard_loader import TokenShardLoader

    model, _, _ = load_model(checkpoint)
    cfg = config_from_dict(summary["config"])
    caches = [p for p in Path(cfg.data.cache_dir).iterdir() if (p / "meta.json").exists()]
    data = PreparedData.load(caches[0])
    total, count = 0.0, 0
    with torch.no_grad():
        for rank in range(cfg.cluster.num_workers):
            loader = TokenShardLoader(data.tokens("val"), sequence_length(cfg), cfg.trainer.micro_batch_size,
                                      rank, cfg.cluster.num_workers, seed=cfg.trainer.seed + 1)
            for _ in range(cfg.trainer.eval_steps):
                x, y = loader.next_batch()
                _, loss = model(x, y)
                total, count = total + loss.item() * y.numel(), count + y.numel()
    return total / count


def test_ctrl_c_before_the_run_starts_exits_130_in_one_line(tmp_path, corpus_file):
    """Before Ray Train's handler is in place (here: as Ray starts), Ctrl-C ends the command with one
    line, not a KeyboardInterrupt traceback."""
    proc = start(tmp_path, *tiny_overrides(tmp_path, corpus_file), "run.name=early", "cluster.include_dashboard=false")
    for line in proc.stdout:
        if line.startswith("run early: "):  # printed just before Ray starts
            break
    proc.send_signal(signal.SIGINT)
    result = finish(proc)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "interrupted (Ctrl-C); the same command resumes from the run's latest checkpoint, if it has one\n" \
        in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_ctrl_c_then_rerun_on_one_worker_resumes_from_the_object_store_and_exports_there(tmp_path, corpus_file,
                                                                                        s3_storage):
    """run.storage=s3://... and data.path=s3://... (a local S3 server). Ctrl-C checkpoints at the next log
    step and exits (130, interrupted) where Ray Train's own handler would abort the run; SIGTERM does the
    same with exit 0 (test_cluster_e2e's elastic run). The same command with `cluster.num_workers=1`
    downloads the latest checkpoint, reshards its 2-worker ZeRO-3 state and continues (the trainer-level
    test, test_elastic_resume.py, holds the losses to the uninterrupted run's). The summary, the profile,
    W&B's copy and the export are written to the bucket, nothing to a local run directory; the checkpoint
    reproduces the val loss the workers reported, W&B holds both parts as one run, and Serve serves it."""
    from launcher.export import export_run
    from launcher.generate import load
    from launcher.run_dir import RunDir, local_directory
    from launcher.serve_app import newest_export
    from lm.config import ExportAppConfig, ExportConfig, RunConfig
    from lm.export import load_export

    import pyarrow.fs as pafs

    bucket = s3_storage.split("/")[2]  # the corpus too is read from the bucket
    pafs.copy_files(str(corpus_file), f"{bucket}/data/corpus.txt",
                    destination_filesystem=pafs.FileSystem.from_uri(s3_storage)[0])
    base = [o for o in tiny_overrides(tmp_path, corpus_file) if not o.startswith(("run.storage=", "data.path="))] + [
        f"run.storage={s3_storage}", f"data.path=s3://{bucket}/data/", "run.name=e2e", "trainer.max_steps=45",
        "deepspeed=zero3"]
    run_dir = RunDir(s3_storage, "e2e")

    proc = start(tmp_path, *base)  # interrupted after its first checkpoint: Ctrl-C, as a terminal sends it
    wait_for_checkpoint(run_dir, 15, proc)
    proc.send_signal(signal.SIGINT)
    first = finish(proc)
    assert first.returncode == 130, first.stderr[-3000:]
    assert "Ctrl-C: the workers checkpoint at their next log step, then the run exits (Ctrl-C again aborts" \
        in first.stderr
    stopped_at = int(re.search(r"stopped by Ctrl-C at step (\d+) of 45", first.stdout).group(1))
    assert 15 < stopped_at < 45 and stopped_at % 5 == 0  # the first log step after the signal
    summary_first = json.loads(run_dir.read_text("summary.json"))
    assert summary_first["steps"] == stopped_at
    assert summary_first["checkpoint"] == f"{s3_storage}/e2e/checkpoint_{stopped_at:06d}"

    # The same command on one worker continues where the first stopped; Ray's dashboard does not change
    # training, nor does profiling its last two steps.
    second = launch(tmp_path, *base, "cluster.num_workers=1", "trainer.micro_batch_size=8",
                    "cluster.include_dashboard=false", "trainer.profile_at=44", "trainer.profile_steps=2",
                    "logging.log_model=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "View the dashboard at" in first.stdout + first.stderr
    assert "View the dashboard at" not in second.stdout + second.stderr
    assert f"resuming run e2e from {s3_storage}/e2e/checkpoint_{stopped_at:06d}" in second.stdout
    assert "written by 2 workers, resumed on 1: state that ZeRO partitioned by rank is resharded" in second.stdout
    assert "8 -> 8 sequences per step" in second.stdout
    assert "sample:" in second.stdout, "from a downloaded copy of the final checkpoint"
    assert f"profile:    {s3_storage}/e2e/profile/steps_44-45" in second.stdout
    assert sorted(run_dir.sizes("profile/steps_44-45")) == ["rank0.ops.txt", "rank0.pt.trace.json"]
    assert f"summary:    {s3_storage}/e2e/summary.json" in second.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outputs", "wandb"], "no local run directory"

    summary = json.loads(run_dir.read_text("summary.json"))
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["steps"] == 45 and summary["tokens"] == 45 * 8 * 1 * 1 * 64
    assert summary["config"]["cluster"]["num_workers"] == 1
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
    assert 0 < summary["val_accuracy"] < 1 and summary["tokens_per_second"] > 0 and 0 < summary["mfu"] < 1
    assert summary["wall_seconds"] > 0 and summary["vocab_size"] == 512
    assert summary["config"]["run"]["name"] == "e2e" and summary["config"]["model"]["vocab_size"] == 512
    assert summary["checkpoint"] == f"{s3_storage}/e2e/checkpoint_000045"
    # The checkpoint loads and reproduces the val loss the workers reported.
    checkpoint = local_directory(summary["checkpoint"], tmp_path / "checkpoint-copy")
    assert recompute_val_loss(summary, checkpoint) == pytest.approx(summary["val_loss"], abs=1e-4)

    # W&B offline runs hold the logged metrics; the second continues the first's W&B run where it stopped.
    run1, run2 = read_run(summary_first["wandb_dir"]), read_run(summary["wandb_dir"])
    assert summary_first["wandb_dir"] != summary["wandb_dir"]
    assert run2["run_id"] == run1["run_id"] and (run1["resume"], run2["resume"]) == (False, True)
    assert summary["wandb_dir"].endswith(run1["run_id"])
    upload = re.search(r"`wandb sync (\S+)` uploads it", second.stdout).group(1)  # both parts, as one run
    assert sorted(glob.glob(upload)) == sorted([summary_first["wandb_dir"], summary["wandb_dir"]])
    steps1 = [h["_step"] for h in run1["history"] if "train_loss" in h]
    steps2 = [h["_step"] for h in run2["history"] if "train_loss" in h]
    assert steps1 == list(range(5, stopped_at + 1, 5)) and steps2 == list(range(stopped_at + 5, 46, 5))
    metrics = {k for h in run1["history"] + run2["history"] for k in h}
    assert {"train_loss", "val_loss", "val_perplexity", "val_accuracy", "lr", "grad_norm", "tokens_per_second",
            "mfu", "memory_mb"} <= metrics
    first_loss = run1["history"][0]["train_loss"]
    last_loss = [h["train_loss"] for h in run2["history"] if "train_loss" in h][-1]
    assert last_loss < first_loss - 0.3, (first_loss, last_loss)
    assert run2["config"]["model"]["n_embd"] == 256
    assert run1["artifacts"] == [] and run2["artifacts"][0] == {
        "name": f"profile-{run1['run_id']}", "type": "profile", "aliases": ["latest", "steps_44-45"],
        "files": ["ops.txt", "trace.pt.trace.json"]}, "rank 0's trace, for W&B's trace viewer"
    model = run2["artifacts"][1]  # logging.log_model: the final checkpoint, by reference into the bucket
    assert (model["name"], model["type"], model["aliases"]) == ("model-e2e", "model", ["latest", "step_45"])
    assert set(model["files"]) == set(run_dir.sizes("checkpoint_000045")) and "trainer_state.json" in model["files"]
    assert len(run2["artifacts"]) == 2
    # Rank 0 copied its offline W&B run into the bucket (its node may be gone after a job on a cluster).
    copy = f"wandb/{Path(summary['wandb_dir']).name}"
    assert summary["wandb_copy"] == f"{s3_storage}/e2e/{copy}"
    assert f"copied to {s3_storage}/e2e/{copy}" in second.stdout
    assert run_dir.sizes(copy) == {p.relative_to(summary["wandb_dir"]).as_posix(): p.stat().st_size
                                   for p in Path(summary["wandb_dir"]).rglob("*") if p.is_file()}

    # A contradicting override on the existing run fails before Ray and touches nothing in the bucket.
    before = run_dir.listing("")
    clash = launch(tmp_path, *base, "model.n_embd=128")
    assert clash.returncode == 2
    assert "config error: model.n_embd=128 differs from the checkpoint's 256" in clash.stderr
    assert run_dir.listing("") == before

    # The finished run's command once more: nothing to train, so no Ray; the same checkpoint and metrics.
    again = launch(tmp_path, *base, "trainer.sample_tokens=0")
    assert again.returncode == 0 and "run e2e is at step 45, trainer.max_steps=45: nothing to train" in again.stdout
    assert "Started a local Ray instance" not in again.stdout + again.stderr
    assert f"checkpoint: {s3_storage}/e2e/checkpoint_000045" in again.stdout
    assert json.loads(run_dir.read_text("summary.json"))["val_loss"] == summary["val_loss"]

    location = export_run(ExportAppConfig(run=RunConfig(name="e2e", storage=s3_storage),
                                          export=ExportConfig(precision="fp32")))
    assert location == f"{s3_storage}/e2e/exports/fp32-step000045"
    assert newest_export(s3_storage, None) == location == newest_export(s3_storage, "e2e")
    model, _, cfg, precision = load_export(local_directory(location, tmp_path / "serve-cache"))
    assert precision == "fp32" and cfg.n_embd == 256
    serve_from_the_bucket(s3_storage, "e2e", location)
    assert load(f"{s3_storage}/e2e")[2] == location, "a run's URI means its newest export"
    assert load(f"{s3_storage}/e2e/checkpoint_000045")[2] == f"{s3_storage}/e2e/checkpoint_000045"


def serve_from_the_bucket(storage: str, run_name: str, location: str) -> None:
    """Ray Serve over HTTP with run.storage in the bucket: the replica downloads the newest export."""
    import contextlib
    import shutil
    import tempfile

    from openai import OpenAI
    from ray import serve

    from conftest import served
    from launcher.serve_app import build

    copy = Path(tempfile.gettempdir()) / "lmstack-exports" / re.sub(r"[^A-Za-z0-9_.-]", "_", location)
    try:
        with served(build({"storage": storage})) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            reply = client.completions.create(model=run_name, prompt="def ", max_tokens=4, temperature=0)
            assert reply.model == run_name and reply.usage.completion_tokens >= 1
            info = serve.get_deployment_handle("LanguageModel", app_name="lm").info.remote().result()
            assert info["export_dir"] == location
            assert (copy / "model.safetensors").is_file(), "the replica's copy"
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        copy.with_name(copy.name + ".lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            copy.parent.rmdir()


def test_wandb_config_shows_what_auto_precision_resolved_to_and_the_tags_and_notes(tmp_path):
    from launcher.wandb_logger import WandbLogger

    from launcher.schema import to_train_config

    logging = to_train_config(composed("logging.tags=[baseline,bf16]", "logging.notes=first try",
                                       f"logging.dir={tmp_path}")).logging
    logger = WandbLogger(logging, "auto", None, {"trainer": {"precision": "auto", "seed": 1}})
    logger.update_config({"trainer": {"precision": "bf16", "seed": 1}})  # the trainer's `started` hook
    logger.finish()
    run = read_run(logger.run_dir)
    assert run["config"]["trainer"] == {"precision": "bf16", "seed": 1}
    assert (run["tags"], run["notes"]) == (["baseline", "bf16"], "first try")


def test_a_logger_given_a_run_id_continues_that_wandb_run(tmp_path):
    from launcher.wandb_logger import WandbLogger
    from lm.config import LoggingConfig

    first = WandbLogger(LoggingConfig(dir=str(tmp_path)), "resumed", None, {})
    first.log({"train_loss": 2.0}, 10)
    first.finish()
    second = WandbLogger(LoggingConfig(dir=str(tmp_path)), "resumed", None, {}, run_id=first.run_id)
    second.log({"train_loss": 1.0}, 20)
    second.finish()
    runs = [read_run(logger.run_dir) for logger in (first, second)]
    assert first.run_dir != second.run_dir and runs[0]["run_id"] == runs[1]["run_id"] == first.run_id
    assert [r["resume"] for r in runs] == [False, True]
    assert [h["_step"] for r in runs for h in r["history"]] == [10, 20]
