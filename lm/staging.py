"""Directories that appear whole: written beside their final name, then renamed into place, so a
crash or an error leaves no half-written directory that looks complete (exports, DeepSpeed's
universal checkpoints, downloads); and a lock that lets one process of a machine write at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """An empty directory beside `final` for the block to fill; when the block completes it replaces
    `final` (whatever was there), and on an error it is removed and `final` is left as it was."""
    final = Path(final)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def node_lock(path: str | Path) -> Iterator[None]:
    """One process of this machine at a time (a node's ranks share one download)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
