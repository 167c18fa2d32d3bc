"""A run's directory in an object store (a local S3 server) reads as one on a filesystem does:
the same checkpoints count, files are written whole, and downloads are shared and reused."""

import dataclasses
import json
import os
import threading
import time

import pytest

from conftest import composed
from launcher.run_dir import RunDir
from launcher.schema import to_train_config
from launcher.storage import check_run_storage
from lm.config import ConfigError
from test_checkpoint import fake_checkpoint


@pytest.fixture(params=["path", "s3"])
def storage(request, tmp_path):
    return request.getfixturevalue("s3_storage") if request.param == "s3" else str(tmp_path / "runs")


def put_checkpoint(run_dir: RunDir, local_root, step: int, **damage):
    name = f"checkpoint_{step:06d}"
    path = fake_checkpoint(local_root / name, step, **damage)
    run_dir.upload(path, name)
    return name


def test_files_are_written_read_listed_and_deleted(storage):
    run_dir = RunDir(storage, "run")
    assert not run_dir.exists() and run_dir.listdir() == [] and run_dir.latest_checkpoint() is None
    where = run_dir.write_text("summary.json", json.dumps({"steps": 3}))
    assert where == f"{storage}/run/summary.json"
    assert json.loads(run_dir.read_text("summary.json")) == {"steps": 3}
    assert run_dir.listdir() == ["summary.json"], "no staging file left beside it"
    assert run_dir.mtime("summary.json") > 0
    run_dir.delete("summary.json")
    run_dir.delete("summary.json")  # already gone: nothing to do
    assert not run_dir.exists("summary.json")


def test_the_latest_complete_checkpoint_counts(storage, tmp_path):
    run_dir = RunDir(storage, "run")
    put_checkpoint(run_dir, tmp_path / "a", 10)
    put_checkpoint(run_dir, tmp_path / "a", 20)
    put_checkpoint(run_dir, tmp_path / "a", 30, ranks=(0,))  # rank 1's part never arrived
    assert run_dir.latest_checkpoint() == "checkpoint_000020"
    assert run_dir.trainer_state("checkpoint_000020")["step"] == 20
    assert run_dir.config("checkpoint_000020").cluster.num_workers == 2


def test_a_short_file_in_the_store_does_not_count(s3_storage, tmp_path):
    run_dir = RunDir(s3_storage, "run")
    put_checkpoint(run_dir, tmp_path, 10)
    newer = fake_checkpoint(tmp_path / "newer", 20)
    (newer / "deepspeed" / "shard_1.pt").write_bytes(b"x" * 40)  # listed at 100 bytes
    run_dir.upload(newer, "checkpoint_000020")
    assert not run_dir.is_complete("checkpoint_000020")
    assert run_dir.latest_checkpoint() == "checkpoint_000010"


def test_a_damaged_latest_checkpoint_is_refused_by_name_and_a_stale_ray_checkpoint_list_removed(storage, tmp_path):
    """Bytes a crash or a disk lost (zeroed, the size kept) pass the manifests' size check; every worker
    group would fail loading them (and retry, with cluster.max_failures), so the driver names the file
    and the way on. Moved aside, the checkpoint is gone from Ray Train's own list of the run's checkpoints,
    which then would stop every run there: that list is removed, as is one another Ray version wrote."""
    import ray
    import torch

    from launcher.run_dir import RAY_SNAPSHOT
    from launcher.train import latest_resumable_checkpoint
    from lm.checkpoint import write_part_manifest

    run_dir = RunDir(storage, "run")
    cfg = to_train_config(composed(f"run.storage={storage}", "run.name=run"))
    source = tmp_path / "checkpoint"
    for step in (10, 20):
        (source / "deepspeed").mkdir(parents=True, exist_ok=True)
        (source / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (source / "trainer_state.json").write_text(json.dumps({"step": step}))
        for rank in (0, 1):
            torch.save({"weights": torch.ones(100)}, source / "deepspeed" / f"shard_{rank}.pt")
            write_part_manifest(source, rank)
        if step == 20:
            shard = source / "deepspeed" / "shard_1.pt"
            shard.write_bytes(bytes(shard.stat().st_size))
        run_dir.upload(source, f"checkpoint_{step:06d}")
    assert run_dir.damaged_file("checkpoint_000010") is None
    assert run_dir.latest_checkpoint() == "checkpoint_000020"  # its sizes are right
    with pytest.raises(ConfigError) as error:
        latest_resumable_checkpoint(cfg, run_dir)
    latest = run_dir.where("checkpoint_000020")
    assert str(error.value) == (
        f"run.name='run': its latest checkpoint {latest} is damaged: deepspeed/shard_1.pt (File is not a zip file); "
        f"move it aside to resume from the one before it (mv {latest} {run_dir.where('damaged_checkpoint_000020')}), "
        "or choose another run.name")

    def ray_list(version: str, *names: str) -> None:
        run_dir.write_text(RAY_SNAPSHOT, json.dumps({"ray_version": version, "checkpoint_results": [
            {"checkpoint_dir_name": name} for name in names]}))

    ray_list(ray.__version__, "checkpoint_000010", "checkpoint_000020")
    assert run_dir.reconcile_ray_snapshot() is None and run_dir.exists(RAY_SNAPSHOT)  # it agrees: kept
    run_dir.fs.delete_dir(f"{run_dir.path}/checkpoint_000020")  # moved aside, or deleted by hand
    assert run_dir.reconcile_ray_snapshot() == "it names checkpoint_000020, which is gone"
    assert not run_dir.exists(RAY_SNAPSHOT)
    ray_list("2.9.0", "checkpoint_000010")
    assert run_dir.reconcile_ray_snapshot() == f"Ray 2.9.0 wrote it, this is Ray {ray.__version__}"
    run_dir.write_text(RAY_SNAPSHOT, "{")
    assert run_dir.reconcile_ray_snapshot() == "it could not be read" and not run_dir.exists(RAY_SNAPSHOT)
    assert latest_resumable_checkpoint(cfg, run_dir) == "checkpoint_000010"


def test_a_run_is_trained_by_one_process_at_a_time_and_a_killed_ones_lock_is_gone(tmp_path):
    """A second `make train` of a run still training would resume from its checkpoints and write the same
    ones beside it: the driver holds the run directory's lock, which the kernel releases however it ends."""
    import signal
    import subprocess
    import sys

    from conftest import REPO
    from lm.run_lock import training_lock

    run_dir = str(tmp_path / "runs" / "run")
    with training_lock(run_dir, "run"):
        with pytest.raises(ConfigError, match=rf"^run.name='run' is being trained by pid {os.getpid()} on .+ since "
                                              r"[-0-9: ]+: wait for it to end, stop it \(Ctrl-C or SIGTERM: it "
                                              r"checkpoints first\), or choose another run.name$"):
            with training_lock(run_dir, "run"):
                pass
    holder = subprocess.Popen([sys.executable, "-c", "from lm.run_lock import training_lock\n"
                               f"with training_lock({run_dir!r}, 'run'):\n"
                               "    print('held', flush=True); input()"],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(ConfigError, match=rf"being trained by pid {holder.pid} "):
        with training_lock(run_dir, "run"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with training_lock(run_dir, "run"):  # no stale lock
        pass


def test_a_download_is_shared_by_a_nodes_processes_and_reused_until_the_source_changes(s3_storage, tmp_path):
    run_dir = RunDir(s3_storage, "run")
    name = put_checkpoint(run_dir, tmp_path / "src", 10)
    cache = tmp_path / "cache"
    copies = []
    threads = [threading.Thread(target=lambda: copies.append(run_dir.local_copy(name, cache))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(copies)) == 1
    copy = copies[0]
    assert (copy / "deepspeed" / "shard_1.pt").read_bytes() == b"x" * 100
    assert sorted(p.name for p in cache.iterdir()) == [name, name + ".lock"], "no partial download left"
    (copy / "marker").write_text("kept")
    assert run_dir.local_copy(name, cache) == copy and (copy / "marker").exists(), "reused"
    run_dir.write_text(f"{name}/trainer_state.json", json.dumps({"step": 10, "more": 1}))
    assert not (run_dir.local_copy(name, cache) / "marker").exists(), "the source changed: downloaded again"
    (copy / "marker").write_text("kept")
    time.sleep(1.1)  # the store keeps times to the second
    run_dir.write_text(f"{name}/trainer_state.json", json.dumps({"step": 10, "more": 2}))  # the same size
    assert not (run_dir.local_copy(name, cache) / "marker").exists(), "rewritten: downloaded again"


def test_on_a_filesystem_the_local_copy_is_the_directory_itself(tmp_path):
    run_dir = RunDir(str(tmp_path / "runs"), "run")
    name = put_checkpoint(run_dir, tmp_path / "src", 10)
    assert run_dir.local_copy(name, tmp_path / "cache") == tmp_path / "runs" / "run" / name
    assert not (tmp_path / "cache").exists()


def test_uploads_put_the_named_files_last(s3_storage, tmp_path):
    import pyarrow.fs as pafs

    src = tmp_path / "export"
    src.mkdir()
    for name in ("export.json", "model.safetensors", "a.txt"):
        (src / name).write_text(name)
    run_dir = RunDir(s3_storage, "run")
    order = []
    original = pafs.copy_files
    pafs.copy_files = lambda source, dest, **kw: (order.append(dest.rsplit("/", 1)[1]), original(source, dest, **kw))
    try:
        run_dir.upload(src, "exports/fp32", last=("export.json",))
    finally:
        pafs.copy_files = original
    assert order[-1] == "export.json" and sorted(order) == ["a.txt", "export.json", "model.safetensors"]
    assert run_dir.read_text("exports/fp32/model.safetensors") == "model.safetensors"


def test_storage_that_cannot_be_used_is_refused_in_one_line(s3_storage):
    check_run_storage(to_train_config(composed(f"run.storage={s3_storage}")))
    missing = s3_storage.replace("s3://test-", "s3://missing-")
    for storage, reason in ((missing, "bucket 'missing-.*' does not exist"), ("nosuch://x/runs", "nosuch")):
        cfg = to_train_config(composed(f"run.storage={storage}"))
        with pytest.raises(ConfigError, match=f"run.storage='{storage}' cannot be used: .*{reason}.*allowed: a "
                                              "filesystem path, or a URI"):
            check_run_storage(cfg)


def test_a_storage_path_that_cannot_be_written_is_refused_before_the_data_is_prepared(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    check_run_storage(to_train_config(composed(f"run.storage={tmp_path}/new/runs")))
    assert not (tmp_path / "new").exists(), "checked, not made"
    with pytest.raises(ConfigError, match=rf"^run.storage='{tmp_path}/a_file/runs' cannot be written: {tmp_path}/a_file "
                                          r"is a file; allowed: a directory this user can create and write$"):
        check_run_storage(to_train_config(composed(f"run.storage={tmp_path}/a_file/runs")))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only directory (root may write anywhere)
    with pytest.raises(ConfigError, match=rf"cannot be written: {tmp_path} is not writable by this user"):
        check_run_storage(to_train_config(composed(f"run.storage={tmp_path}/runs")))


def test_export_and_serve_refuse_a_missing_bucket_in_one_line(s3_storage, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    missing = s3_storage.replace("s3://test-", "s3://missing-")
    for module, field in (("launcher.export", "run.storage"), ("launcher.serve", "serve.export_dir")):
        override = f"{field}={missing}/x" if field == "serve.export_dir" else f"run.storage={missing}"
        result = subprocess.run([sys.executable, "-m", module, override, "run.name=x"], cwd=tmp_path, text=True,
                                capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith(f"config error: {field}='{missing}")


def test_a_storage_uri_with_pyarrow_options_keeps_them_in_every_location(s3_storage, s3_server, tmp_path, monkeypatch):
    """`s3://bucket/runs?endpoint_override=host:port&scheme=http` (MinIO, as Ray Train takes it): the
    paths go before the query, which every location handed on keeps."""
    from launcher.generate import download_model_dir
    from launcher.run_dir import local_directory
    from lm.remote_files import mirror

    host_port = s3_server.removeprefix("http://")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from the query alone
    storage = f"{s3_storage}?endpoint_override={host_port}&scheme=http"
    check_run_storage(to_train_config(composed(f"run.storage='{storage}'")))  # quoted for Hydra: it holds '='
    run_dir = RunDir(storage, "run")
    query = f"?endpoint_override={host_port}&scheme=http"
    assert run_dir.write_text("summary.json", "{}") == f"{s3_storage}/run/summary.json{query}"
    name = put_checkpoint(run_dir, tmp_path / "src", 10)
    assert run_dir.latest_checkpoint() == name
    location = run_dir.where(name)
    copy = local_directory(location, tmp_path / "cache")
    assert (copy / "trainer_state.json").is_file() and "endpoint_override" not in copy.name
    assert download_model_dir(run_dir.where(), str(tmp_path / "load"))[1] == location, "a run: its latest checkpoint"
    files = mirror(f"{s3_storage}/run/{name}/rng/*.pt?endpoint_override={host_port}&scheme=http", tmp_path / "dl")
    assert sorted(p.name for p in files) == ["rank_0.pt", "rank_1.pt"], "a glob before the query"
