"""The trainer runs without Ray: `torchrun -m lm.standalone` on 2 processes, then reruns resume."""

import json
import os
import subprocess
import sys

from conftest import REPO, free_port
from lm.checkpoint import find_latest_checkpoint
from lm.config import config_to_dict


def torchrun(config_path, dataset_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "lm.standalone", "--config", str(config_path), "--dataset-dir", str(dataset_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_torchrun_trains_checkpoints_and_resumes(tiny_train_config, prepared_tiny, tmp_path):
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
    assert sorted(p.name for p in (tmp_path / "standalone").iterdir()) == ["checkpoint_000002", "checkpoint_000004"]
