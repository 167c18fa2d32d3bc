"""One training process per run. A second `make train` of a run.name still training would resume
from the first one's checkpoints, write checkpoints of the same names beside it, and share its
staging directory and stop-request file; so the process that commits checkpoints (the Ray driver,
or rank 0 under torchrun) holds an exclusive lock on the run directory while it trains (flock, which
the kernel releases however the process ends). Runs in an object store, or on a filesystem without
locks, are not locked."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from lm.config import ConfigError

LOCK_FILE = ".train.lock"


@contextlib.contextmanager
def training_lock(run_dir: str, run_name: str, remote: bool = False):
    """Held while the body runs; a run already held elsewhere is a ConfigError naming its holder."""
    if remote:
        yield
        return
    import fcntl

    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:  # what storage.check_writable_directory could not foresee (/proc, a full disk)
        raise ConfigError(f"run.storage={os.path.dirname(run_dir)!r} cannot be written: {error}") from None
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"run.name={run_name!r} is being trained by {holder}: wait for it to end, stop it "
                              "(Ctrl-C or SIGTERM: it checkpoints first), or choose another run.name") from None
        except OSError:  # a filesystem without locks (NFS mounted nolock): train unlocked, as before
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                      .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
