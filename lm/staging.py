"""Directories that appear whole: written beside their final name, then renamed into place, so a
crash or an error leaves no half-written directory that looks complete (exports, DeepSpeed's
universal checkpoints, downloads)."""

from __future__ import annotations

import contextlib
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
