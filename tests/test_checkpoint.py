"""Which directories count as checkpoints: only those every rank has finished writing."""

import json

import pytest

from lm.checkpoint import find_latest_checkpoint, is_complete, write_part_manifest


def fake_checkpoint(path, step, world=2, ranks=(0, 1)):
    """Ranks' parts as Ray merges them in storage: each rank's files, then its manifest."""
    (path / "deepspeed").mkdir(parents=True)
    (path / "rng").mkdir()
    (path / "config.json").write_text(json.dumps({"cluster": {"num_workers": world}}))
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    for r in ranks:
        (path / "deepspeed" / f"shard_{r}.pt").write_bytes(b"x" * 100)
        (path / "rng" / f"rank_{r}.pt").write_bytes(b"x")
        write_part_manifest(path, r)
    return path


def test_latest_complete_checkpoint_wins(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint_000010", 10)
    fake_checkpoint(tmp_path / "checkpoint_000020", 20)
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_000020"


@pytest.mark.parametrize("damage", ["missing rank", "short shard", "missing shard", "empty config", "empty state",
                                    "no state"])
def test_partly_written_checkpoints_do_not_count(tmp_path, damage):
    fake_checkpoint(tmp_path / "checkpoint_000010", 10)
    newer = fake_checkpoint(tmp_path / "checkpoint_000020", 20, ranks=(0,) if damage == "missing rank" else (0, 1))
    if damage == "short shard":  # a node lost while its part was being copied into storage
        (newer / "deepspeed" / "shard_1.pt").write_bytes(b"x" * 40)
    elif damage == "missing shard":
        (newer / "deepspeed" / "shard_1.pt").unlink()
    elif damage == "empty config":
        (newer / "config.json").write_text("")
    elif damage == "empty state":
        (newer / "trainer_state.json").write_text("")
    elif damage == "no state":
        (newer / "trainer_state.json").unlink()
    assert not is_complete(newer)
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_000010"
