"""Which directories count as checkpoints: only those every rank has finished writing."""

import json

import pytest

from lm.checkpoint import find_latest_checkpoint, is_complete


def fake_checkpoint(path, step, world=2, ranks=(0, 1)):
    (path / "deepspeed").mkdir(parents=True)
    (path / "rng").mkdir()
    (path / "config.json").write_text(json.dumps({"cluster": {"num_workers": world}}))
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    for r in ranks:
        (path / "rng" / f"rank_{r}.pt").write_bytes(b"x")
    return path


def test_latest_complete_checkpoint_wins(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint_000010", 10)
    fake_checkpoint(tmp_path / "checkpoint_000020", 20)
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_000020"


@pytest.mark.parametrize("damage", ["missing rank", "empty config", "empty state", "no state"])
def test_partly_written_checkpoints_do_not_count(tmp_path, damage):
    fake_checkpoint(tmp_path / "checkpoint_000010", 10)
    newer = fake_checkpoint(tmp_path / "checkpoint_000020", 20, ranks=(0,) if damage == "missing rank" else (0, 1))
    if damage == "empty config":
        (newer / "config.json").write_text("")
    elif damage == "empty state":
        (newer / "trainer_state.json").write_text("")
    elif damage == "no state":
        (newer / "trainer_state.json").unlink()
    assert not is_complete(newer)
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_000010"
