"""SIGTERM (preemption, `ray job stop`, a scheduler's time limit) -> checkpoint, then exit cleanly.

The driver cannot reach into the workers' loops, so it leaves a request file in the run directory
(which every node can see: multi-node runs need shared storage or an object store). Workers check it at their log
steps, agree through the loss all-reduce they already do there, checkpoint at that step and
return; the driver then writes the summary as usual. `ray job stop` waits
RAY_JOB_STOP_WAIT_TIME_S (cluster/runtime_env.yaml raises Ray's 3 s default) before SIGKILL.
"""

from __future__ import annotations

import signal
import sys

from launcher.run_dir import RunDir

STOP_FILE = ".stop_requested"


class StopOnSigterm:
    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def install(self) -> None:
        """Call after ray.init(), which installs its own exit-at-once SIGTERM handler."""
        self.clear()
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.run_dir.write_text(STOP_FILE, "SIGTERM\n")
        sys.stderr.write("SIGTERM: the workers checkpoint at their next log step, then the run exits\n")
        sys.stderr.flush()

    @property
    def requested(self) -> bool:
        return self.run_dir.exists(STOP_FILE)

    def clear(self) -> None:
        self.run_dir.delete(STOP_FILE)
