"""Real Ray processes on loopback: `make cluster-up` + `ray job submit` (and `serve deploy` of a run it
trained), and a 2-node cluster where a run loses a worker, a node, and a rank in the middle of a
checkpoint save and still ends with the weights of an uninterrupted run (resume is exact). Ctrl-C is tested end to end in test_train_e2e.py, SIGTERM here.
The uninterrupted run is the same training loop on 2 gloo ranks without Ray, so these tests also
show that Ray's scheduling changes nothing."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, composed, free_port, run_on_ranks, wait_for_checkpoint
from launcher.ray_worker import CRASH_IN_CHECKPOINT_ENV, staging_root
from lm.checkpoint import find_latest_checkpoint, is_complete, load_consolidated_state_dict
from wandb_offline import read_run

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


# Train's controller acts on a worker group's changes (started, finished, failed) when it next polls it:
# every 2 s by default, 0.25 s as the launcher's own local Ray does. These clusters run as many as four
# groups a run; what is tested (placement, resumes, failures counted) does not depend on when it polls.
TEST_CLUSTER_ENV = {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def env() -> dict:
    return {**os.environ, **TEST_CLUSTER_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}


def set_test_cluster_env(monkeypatch) -> None:
    """The environment of a cluster_utils.Cluster's processes, and so of Train's controller and workers."""
    for name, value in TEST_CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)


def training_overrides(tmp_path: Path, corpus_file: Path, name: str, logging: str = "none") -> list[str]:
    """A run slow enough (~0.1 s/step) to be interrupted between checkpoints, short enough for CI."""
    return ["model=tiny", "model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=64",
            "data=text", f"data.path={corpus_file}", "data.vocab_size=512", f"data.cache_dir={tmp_path}/cache",
            "cluster.num_workers=2", "deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.max_steps=45",
            "trainer.ckpt_every=15", "trainer.eval_every=30", "trainer.eval_steps=2", "trainer.log_every=10",
            "trainer.keep_checkpoints=10", "trainer.sample_tokens=0", f"logging={logging}",
            f"logging.dir={tmp_path}/wandb-{name}", f"run.storage={tmp_path}/runs", f"run.name={name}"]


def launch(*overrides, wait=True):
    cmd = [sys.executable, "-m", "launcher.train", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc if not wait else finish(proc)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def final_weights(run_dir: Path) -> dict:
    latest = find_latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "checkpoint_000045"
    return load_consolidated_state_dict(latest)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster")


def train_without_ray(rank, cfg_dict, dataset_dir, run_dir):
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    train(config_from_dict(cfg_dict), dataset_dir, local_hooks(run_dir, rank, keep=1, log=lambda m, s: None))


@pytest.fixture(scope="module")
def reference_weights(workdir, corpus_file):
    """The uninterrupted run every interrupted one must reproduce: the config `launcher.train` composes
    from the same overrides, on the token cache it builds, trained by lm.trainer on 2 ranks without Ray."""
    from launcher.schema import to_train_config
    from launcher.train import prepare_dataset
    from lm.config import config_to_dict

    cfg = to_train_config(composed(*training_overrides(workdir, corpus_file, "reference")))
    prepared = prepare_dataset(cfg)  # the same cache the Ray runs below then reuse
    run_dir = workdir / "runs" / "reference"
    run_on_ranks(train_without_ray, 2, config_to_dict(cfg), str(prepared.directory), str(run_dir), tmp_path=workdir)
    return final_weights(run_dir)


def ray_train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes of the cluster this test process started."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        cmdline = " ".join(proc.cmdline())
        if "RayTrainWorker" in cmdline and "TrainController" not in cmdline:
            found.append(proc)
    return found


def worker_groups(out: str) -> list[set[str]]:
    """The nodes each successive worker group ran on, from the ranks' `worker rank r/2 on node X` lines."""
    placed = re.findall(r"worker rank \d/2 on node (\w+)", out)
    return [set(placed[i:i + 2]) for i in range(0, len(placed), 2)]


def test_a_run_survives_a_killed_worker_and_a_lost_node_and_a_crash_in_a_save_keeps_the_last_checkpoint(
        workdir, corpus_file, reference_weights, monkeypatch):
    """One run on a 2-node cluster, its 2 workers spread over both nodes, meets three failures:
    1. the second node removed after step 15's checkpoint: the group restarts on the head, from 15;
    2. a worker SIGKILLed after step 30's checkpoint: Ray restarts the group, which resumes from 30;
    3. rank 1 dying inside step 45's save: a third failure (max_failures=2), so the run fails.
    The half-written checkpoint never becomes the latest, and rerunning the command ends with the
    weights of the uninterrupted run. Each of the four worker groups logs to the same W&B run."""
    from ray.cluster_utils import Cluster

    set_test_cluster_env(monkeypatch)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # every attempt's placement lines, even when they repeat
    crash = workdir / "crash-rank-1-in-the-save-of-step-45"
    crash.touch()
    monkeypatch.setenv(CRASH_IN_CHECKPOINT_ENV, f"45:1:{crash}")  # the cluster's workers inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_dir = workdir / "runs" / "failures"
        overrides = training_overrides(workdir, corpus_file, "failures", "wandb_offline") + [
            "cluster=multi_node", f"cluster.address={cluster.address}", "cluster.shared_storage=true",
            "cluster.num_workers=2", "cluster.max_failures=2", "cluster.placement_strategy=SPREAD"]
        proc = launch(*overrides, wait=False)
        wait_for_checkpoint(run_dir, 15, proc)
        cluster.remove_node(worker_node)
        wait_for_checkpoint(run_dir, 30, proc)
        workers = ray_train_workers()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGKILL)
        code, out = finish(proc)

        assert code != 0, out[-3000:]
        groups = worker_groups(out)
        assert [len(nodes) for nodes in groups] == [2, 1, 1], "spread over both nodes, then on the head"
        for step in (15, 30):
            assert f"worker group resumes from {run_dir}/checkpoint_{step:06d}" in out
        assert find_latest_checkpoint(run_dir).name == "checkpoint_000030"
        assert not is_complete(run_dir / "checkpoint_000045")
        staged = Path(staging_root("failures"))
        assert list(staged.glob("ckpt_000045_rank1_*")), "the crashed rank's staged part was left behind"

        crash.unlink()
        code, out = launch(*overrides)  # the same command again continues from step 30
        assert code == 0, out[-3000:]
        assert f"resuming run failures from {run_dir}/checkpoint_000030" in out
        assert_same_weights(final_weights(run_dir), reference_weights)
        assert not staged.exists(), "the rerun removed what the failed workers had staged, then the directory"

        # One W&B run: each group's offline directory (offline-run-<time>-<id>) carries the first
        # group's run id, and the rerun's history continues after the checkpoint it resumed from.
        # (A group whose rank 0 was killed, with its node or by SIGKILL, may leave its file empty:
        # W&B had not flushed it. The rerun ends normally.)
        attempts = sorted((workdir / "wandb-failures" / "wandb").glob("offline-run-*"))
        ids = {d.name.rsplit("-", 1)[1] for d in attempts}
        assert len(attempts) == 4 and len(ids) == 1, attempts
        runs = [read_run(d, finished=False) for d in attempts[:-1]] + [read_run(attempts[-1])]
        assert all(r["run_id"] in (None, *ids) for r in runs) and runs[-1]["run_id"] in ids
        assert runs[0]["run_id"] is None or not runs[0]["resume"], "the first group started the W&B run"
        assert all(r["resume"] for r in runs[1:] if r["run_id"]), "every later group resumed it"
        assert [h["_step"] for h in runs[-1]["history"] if "train_loss" in h] == [40, 45]
    finally:
        cluster.shutdown()


def checkpoint_written_by(run_dir: Path, workers: int, after: int, proc, timeout: float = 240) -> int:
    """The step of the first complete checkpoint after step `after` that `workers` workers wrote."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in sorted(run_dir.glob("checkpoint_0*")):
            step = int(path.name.split("_")[1])
            if step > after and is_complete(path) and \
                    json.loads((path / "config.json").read_text())["cluster"]["num_workers"] == workers:
                return step
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no checkpoint by {workers} workers after step {after}: {proc.communicate()[0][-3000:]}")


def test_an_elastic_run_shrinks_when_a_node_is_lost_and_grows_back_when_it_returns(workdir, corpus_file,
                                                                                  monkeypatch):
    """cluster.min_workers=1: a 2-worker run loses the node of one of its workers. Rather than wait for
    a replacement, Ray Train restarts the group with the one worker the head has room for; it resumes
    from the latest checkpoint, resharded to one rank. When a node joins again, the group grows back
    to 2 workers at its next resize check (cluster.resize_interval_s), resharded again, and a SIGTERM
    then ends the run cleanly."""
    from ray.cluster_utils import Cluster

    set_test_cluster_env(monkeypatch)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # every worker's placement line
    # Right after the loss, Train's view of the cluster may still count the lost node's CPU: it then
    # tries 2 workers first, and gives up on them after this long (Ray's default: 60 s). It is the wait for
    # the group's placement group, which a cluster with room places in well under a second.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_dir = workdir / "runs" / "elastic"
        overrides = training_overrides(workdir, corpus_file, "elastic") + [
            "cluster=multi_node", f"cluster.address={cluster.address}", "cluster.shared_storage=true",
            "cluster.num_workers=2", "cluster.min_workers=1", "cluster.max_failures=3",
            "cluster.resize_interval_s=2", "trainer.max_steps=3000"]  # ended by SIGTERM
        proc = launch(*overrides, wait=False)
        wait_for_checkpoint(run_dir, 15, proc)
        cluster.remove_node(worker_node)
        shrunk = checkpoint_written_by(run_dir, 1, 15, proc)
        cluster.add_node(num_cpus=1)
        grown = checkpoint_written_by(run_dir, 2, shrunk, proc)
        proc.send_signal(signal.SIGTERM)
        code, out = finish(proc)
    finally:
        cluster.shutdown()

    assert code == 0, out[-3000:]
    placed = re.findall(r"worker rank (\d/\d) on node", out)
    assert sorted(placed[:2]) == ["0/2", "1/2"] and placed[2] == "0/1" and sorted(placed[-2:]) == ["0/2", "1/2"], \
        f"2 workers, then the one there was room for, then 2 again: {placed}"
    resumed = re.findall(r"worker group resumes from \S+/checkpoint_(\d+) \(written by (\d) workers: resharded\)", out)
    assert [by for _, by in resumed][-2:] == ["2", "1"], resumed
    assert 15 <= int(resumed[-2][0]) < shrunk <= int(resumed[-1][0]) < grown
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+) of 3000", out).group(1))
    final = find_latest_checkpoint(run_dir)
    assert final.name == f"checkpoint_{stopped:06d}" and stopped >= grown
    assert json.loads((final / "config.json").read_text())["cluster"]["num_workers"] == 2
    assert (run_dir / f"checkpoint_{int(resumed[-1][0]):06d}" / "deepspeed" / "state_universal").is_dir()


@pytest.fixture(scope="module")
def ray_head():
    """`make cluster-up` on free ports; `make cluster-down` afterwards."""
    port, dashboard = free_port(), free_port()
    subprocess.run(["make", "-C", str(REPO), "cluster-up", f"RAY_PORT={port}", f"DASHBOARD_PORT={dashboard}"],
                   check=True, env=env(), capture_output=True, timeout=300)
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run(["make", "-C", str(REPO), "cluster-down"], env=env(), capture_output=True, timeout=120)


def submit(address: str, *entrypoint: str):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", "python", "-m", "launcher.train",
           *entrypoint]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr


def job_overrides(tmp_path: Path, corpus_file: Path, logging: str = "none") -> list[str]:
    return ["model=tiny", "model.block_size=64", "data=text", f"data.path={corpus_file}", "data.vocab_size=512",
            f"data.cache_dir={tmp_path}/cache", f"run.storage={tmp_path}/runs", f"logging={logging}",
            "trainer.max_steps=6", "trainer.eval_every=6", "trainer.ckpt_every=6", "trainer.eval_steps=2",
            "trainer.sample_tokens=10"]


def test_job_with_a_bad_override_fails_with_the_config_error(ray_head, workdir, corpus_file):
    code, out = submit(ray_head, "model.n_embd=65", *job_overrides(workdir / "bad", corpus_file))
    assert code != 0 and "FAILED" in out.upper()
    assert "config error: model.n_embd=65 is invalid: must be divisible by model.n_head=2" in out
    assert not (workdir / "bad" / "runs").exists()


@pytest.fixture(scope="module")
def sweep_job(ray_head, workdir, corpus_file) -> tuple[int, str, Path]:
    """A 2-job Hydra multirun submitted to the cluster: its exit code, its output, and its directory."""
    jobs = workdir / "sweep"
    code, out = submit(ray_head, "-m", "optim.lr=1e-4,1e-3", "cluster=multi_node", "cluster.num_workers=2",
                       "cluster.shared_storage=true", *job_overrides(jobs, corpus_file, "wandb_offline"),
                       f"logging.dir={jobs}/wandb", f"hydra.sweep.dir={jobs}/multirun")
    return code, out, jobs


def test_job_submit_runs_a_multirun_sweep_on_the_cluster(sweep_job):
    """`ray job submit -- python -m launcher.train -m ...`: each job trains on the cluster's workers,
    the sweep's table and summary come back, and the jobs share one W&B group."""
    code, out, jobs = sweep_job
    assert code == 0 and "succeeded" in out, out[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted((jobs / "runs").glob("*/summary.json"))]
    assert sorted(s["config"]["optim"]["lr"] for s in summaries) == [1e-4, 1e-3]
    assert all(s["steps"] == 6 and is_complete(s["checkpoint"]) for s in summaries)

    table = out[out.index("final val_loss"):]
    for lr in ("optim.lr=0.0001", "optim.lr=0.001"):
        line = next(line for line in table.splitlines() if line.startswith(lr))
        float(line.split()[-2])  # the job's final val loss
    sweep = json.loads((jobs / "multirun" / "sweep_summary.json").read_text())
    assert [row["status"] for row in sweep] == ["ok", "ok"]
    groups = {read_run(s["wandb_dir"])["group"] for s in summaries}
    assert len(groups) == 1 and groups.pop() == "sweep-multirun"
    # Across nodes, each job's rank 0 copied its offline W&B run into the run's storage: a whole run there.
    for s in summaries:
        assert Path(s["wandb_copy"]).parent == Path(s["checkpoint"]).parent / "wandb"
        assert read_run(s["wandb_copy"])["group"] == "sweep-multirun"


def test_serve_deploy_serves_a_runs_export_on_the_cluster(ray_head, sweep_job):
    """`serve deploy cluster/serve.yaml` onto the running cluster, as written but for the HTTP port and the
    storage (this test's): the newest export there is served and `serve status` reports it running."""
    import httpx
    import yaml

    from launcher.export import export_run
    from lm.config import ExportAppConfig, ExportConfig, RunConfig

    code, _, jobs = sweep_job
    assert code == 0
    summary = json.loads(next((jobs / "runs").glob("*/summary.json")).read_text())
    run_name = summary["config"]["run"]["name"]
    export_run(ExportAppConfig(run=RunConfig(name=run_name, storage=str(jobs / "runs")),
                               export=ExportConfig(precision="fp32")))
    config = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["storage"] = str(jobs / "runs")
    deployed = jobs / "serve.yaml"
    deployed.write_text(yaml.safe_dump(config))

    def serve_cli(*args: str) -> str:
        result = subprocess.run([str(BIN / "serve"), *args, "--address", ray_head], env=env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout

    serve_cli("deploy", str(deployed))
    deadline = time.time() + 120
    while time.time() < deadline:  # what `serve status` reads, without a CLI process a poll
        app = httpx.get(f"{ray_head}/api/serve/applications/", timeout=30).json()["applications"].get("lm", {})
        assert app.get("status") != "DEPLOY_FAILED", app.get("message")
        if app.get("status") == "RUNNING":
            break
        time.sleep(0.5)
    app = yaml.safe_load(serve_cli("status"))["applications"]["lm"]
    assert app["status"] == "RUNNING" and app["deployments"]["LanguageModel"]["replica_states"] == {"RUNNING": 1}
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                        json={"model": run_name, "prompt": "def main(", "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    # (no `serve shutdown`: 5 s of graceful teardown here, and the fixture's `make cluster-down` stops all)
