"""lm.host_memory: a training process keeps the pages it frees (no fresh page faults for a buffer
freed and allocated again), and a user's own allocator settings are left alone."""

import subprocess
import sys

import pytest

from lm.host_memory import _glibc

# A training step's pattern, 20 times: activations allocated one after another (forward), then all
# freed (backward). The page faults the second 20 steps cost.
FAULTS_PROBE = """
import resource, sys
from lm.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def churn():
    for _ in range(20):
        activations = [bytearray(800 << 10) for _ in range(20)]  # zero-filled: every page touched
        del activations
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True, text=True, check=True,
                         env={**env, "PATH": "/usr/bin:/bin"}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc thresholds only")
def test_freed_memory_is_reused_without_page_faults():
    kept, kept_faults = faults("keep")
    _, default_faults = faults("default")
    assert kept == "True"
    # glibc's default trims the freed 16 MB at the heap's top each time: ~4,000 pages to fault back in.
    assert default_faults > 20 * 2000, f"only {default_faults} page faults with glibc's defaults"
    assert kept_faults < 200, f"{kept_faults} page faults after keep_freed_memory()"


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc thresholds only")
def test_a_users_allocator_settings_win():
    assert faults("keep", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert faults("keep", LD_PRELOAD="")[0] == "True"  # empty: nothing preloaded
