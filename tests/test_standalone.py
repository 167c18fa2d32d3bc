"""The trainer runs without Ray: `torchrun -m lm.standalone` on 2 processes, then reruns resume; and
what the Ray driver checks before it starts, rank 0 checks under torchrun."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port
from lm.checkpoint import find_latest_checkpoint
from lm.config import ConfigError, config_from_dict, config_to_dict
from lm.run_lock import training_lock


def torchrun(config_path, dataset_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "lm.standalone", "--config", str(config_path), "--dataset-dir", str(dataset_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_torchrun_trains_checkpoints_resumes_and_refuses_a_held_run_or_a_damaged_checkpoint(tiny_train_config,
                                                                                             prepared_tiny, tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(max_steps=4, ckpt_every=2, eval_every=2, stop_at_step=2)
    cfg.model.vocab_size = vocab
    cfg.run.name, cfg.run.storage = "standalone", str(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_to_dict(cfg)))

    first = torchrun(config_path, prepared.directory)
    assert first.returncode == 0, first.stderr[-3000:]
    assert find_latest_checkpoint(tmp_path / "standalone").name == "checkpoint_000002"

    cfg.trainer.stop_at_step = None
    config_path.write_text(json.dumps(config_to_dict(cfg)))
    second = torchrun(config_path, prepared.directory)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[step 3]" in second.stdout and "[step 1]" not in second.stdout
    checkpoints = sorted(p.name for p in (tmp_path / "standalone").glob("checkpoint_*"))
    assert checkpoints == ["checkpoint_000002", "checkpoint_000004"]

    # A config that cannot continue the run is named before any rank trains.
    from lm.standalone import resumable_checkpoint

    changed = config_from_dict(config_to_dict(cfg))
    changed.model.n_embd *= 2
    with pytest.raises(ConfigError, match=r"^model.n_embd=\d+ differs from the checkpoint's \d+ "
                                          r"\(run.name='standalone' already has checkpoints at "):
        resumable_checkpoint(changed, tmp_path / "standalone")

    # One process trains a run: a second launch while the first holds it stops in one line.
    with training_lock(str(tmp_path / "standalone"), "standalone"):
        held = torchrun(config_path, prepared.directory)
    assert held.returncode != 0
    assert f"config error: run.name='standalone' is being trained by pid {os.getpid()} " in held.stderr

    # A latest checkpoint whose torch files cannot be read (zeroed, sizes intact) is named, with the way on.
    latest = tmp_path / "standalone" / "checkpoint_000004"
    shard = sorted(latest.rglob("*.pt"))[0]
    shard.write_bytes(bytes(shard.stat().st_size))
    damaged = torchrun(config_path, prepared.directory)
    assert damaged.returncode != 0
    assert (f"config error: run.name='standalone': its latest checkpoint {latest} is damaged: "
            f"{shard.relative_to(latest)} (") in damaged.stderr
    assert f"(mv {latest} {tmp_path}/standalone/damaged_checkpoint_000004)" in damaged.stderr
