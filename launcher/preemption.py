"""SIGTERM (preemption, `ray job stop`, a scheduler's time limit) or Ctrl-C -> checkpoint, then exit
cleanly.

The driver cannot reach into the workers' loops, so it leaves a request file in the run directory
(which every node can see: multi-node runs need shared storage or an object store). Workers check it at their log
steps, agree through the loss all-reduce they already do there, checkpoint at that step and
return; the driver then writes the summary as usual. `ray job stop` waits
RAY_JOB_STOP_WAIT_TIME_S (cluster/runtime_env.yaml raises Ray's 3 s default) before SIGKILL.
Ctrl-C (SIGINT) reaches the driver through Ray Train's own handler (LeanTorchTrainer): the first one
asks for the same stop, a second aborts the run at once, as Ray Train's first does.
"""

from __future__ import annotations

import signal
import sys

from launcher.run_dir import RunDir

STOP_FILE = ".stop_requested"
CTRL_C = "Ctrl-C"


class StopOnSignal:
    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def install(self) -> None:
        """Call after ray.init(), which installs its own exit-at-once SIGTERM handler."""
        self.clear()
        signal.signal(signal.SIGTERM, lambda signum, frame: self.request("SIGTERM"))

    def request(self, reason: str) -> None:
        """Ask the workers to checkpoint at their next log step and return; `reason` names the signal."""
        self.run_dir.write_text(STOP_FILE, f"{reason}\n")
        again = " (Ctrl-C again aborts at once, without a checkpoint)" if reason == CTRL_C else ""
        sys.stderr.write(f"{reason}: the workers checkpoint at their next log step, then the run exits{again}\n")
        sys.stderr.flush()

    @property
    def requested(self) -> str | None:
        """The reason a stop was asked for (SIGTERM, Ctrl-C), or None."""
        return self.run_dir.read_text(STOP_FILE).strip() if self.run_dir.exists(STOP_FILE) else None

    def clear(self) -> None:
        self.run_dir.delete(STOP_FILE)
