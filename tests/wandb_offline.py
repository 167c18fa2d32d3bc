"""Read back what a W&B offline run logged, from its `run-<id>.wandb` file.

The file is LevelDB's log format (32 KiB blocks of CRC/length/type-framed chunks) after a 7-byte
W&B header, holding protobuf `Record`s. wandb 0.31 ships no Python reader for it, so tests use this.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # trailer too small for a chunk header: skip to next block
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0


def _records(path: Path, timeout_s: float) -> list:
    """The file's records once it holds the run's `exit` record. `wandb.finish()` can return before
    W&B's service process has written the last records (seen once in ~20 full test runs: the
    config update missing), so an unfinished file is read again until it is complete or the timeout
    passes (then whatever is there is returned, and the test's assertions say what is missing)."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for payload in _payloads(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(payload)
            except Exception:  # a chunk cut short at the end of a file still being written
                break
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_run(run_dir: str | Path, finished: bool = True) -> dict:
    """{'history': [{key: value, ...} per log call], 'config': {...}, 'group': str, 'run_id': str,
    'resume': bool (the run continues one of that id), 'tags': [str], 'notes': str,
    'artifacts': [{'name', 'type', 'aliases', 'files'}]}. `finished=False` for a run whose process
    was killed: what its file holds, without waiting for the records a finished run ends with."""
    history, config, group, run_id, resume, tags, notes, artifacts = [], {}, None, None, False, [], "", []
    for record in _records(next(Path(run_dir).glob("run-*.wandb")), timeout_s=30.0 if finished else 0.0):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            group = record.run.run_group or group
            run_id, resume = record.run.run_id, bool(record.run.resume)
            tags, notes = list(record.run.tags), record.run.notes
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "artifact":
            a = record.artifact
            artifacts.append({"name": a.name, "type": a.type, "aliases": sorted(a.aliases),  # a set to W&B
                              "files": sorted(entry.path for entry in a.manifest.contents)})
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    return {"history": history, "config": config, "group": group, "run_id": run_id, "resume": resume, "tags": tags,
            "notes": notes, "artifacts": artifacts}
