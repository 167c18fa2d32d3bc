"""Keep freed host memory in the training process, so each step reuses pages instead of faulting them in.

glibc's malloc hands freed memory back to the kernel: blocks above its mmap threshold are unmapped on
free, and free space at the heap's top is trimmed. A CPU training step frees and allocates the same
activations every step, so by default each step faults fresh zeroed pages back in: ~1,200 pages and
~3 ms of kernel time in the recipe's ~27 ms step (RESULTS.md). Raising both thresholds keeps that
memory in the process, as the jemalloc or tcmalloc that Intel's PyTorch launcher preloads do. The
process then holds its peak heap until it exits, which a training worker does anyway.

Only glibc has these knobs. Elsewhere, or where the user may have chosen already (anything in
LD_PRELOAD, where jemalloc or tcmalloc would go; glibc's MALLOC_* variables or GLIBC_TUNABLES), nothing
changes.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks below this come from the heap, and up to this much free heap is kept
_USER_SETTINGS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds to KEEP_BYTES for this process; True if it did."""
    if not _glibc() or any(os.environ.get(name) for name in _USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)  # this process's own symbols, glibc's among them (find_library would run ldconfig)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a glibc system, or no confstr (Windows)
        return False
