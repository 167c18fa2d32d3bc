"""A torch.profiler window over a few training steps, for finding where a step's time goes.

Each rank writes `rank<r>.pt.trace.json` (Chrome trace format: Perfetto, chrome://tracing,
TensorBoard's profiler plugin and Holistic Trace Analysis read it) and `rank<r>.ops.txt`, its
operators by self time. The step before the window runs under the profiler as warm-up, as
torch.profiler advises, so the window does not pay the profiler's own start; in the trace, the
window's steps are `ProfilerStep#1` to `#n`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity


def trace_dir(run_dir: str | Path, first: int, num_steps: int) -> Path:
    """Where a run's profile of steps first .. first+num_steps-1 goes."""
    return Path(run_dir) / "profile" / f"steps_{first}-{first + num_steps - 1}"


class StepProfiler:
    """Profiles training steps `first` .. `first + num_steps - 1`. The loop calls `step_begins(step)`
    and `step_ends(step)` around each step; outside the window (and on a run resumed past its
    warm-up step) both do nothing."""

    def __init__(self, first: Optional[int], num_steps: int, run_dir: Optional[str], rank: int,
                 device: torch.device, on_saved: Callable[[Path], None] = lambda trace: None):
        self.first, self.num_steps, self.rank, self.device, self.on_saved = first, num_steps, rank, device, on_saved
        self.out_dir = trace_dir(run_dir, first, num_steps) if first and run_dir else None
        self.profiler: Optional[torch.profiler.profile] = None

    def step_begins(self, step: int) -> None:
        if self.out_dir is None or step != self.first - 1:
            return
        cuda = self.device.type == "cuda"
        self.profiler = torch.profiler.profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=self.num_steps, repeat=1),
            on_trace_ready=self._save, record_shapes=True)
        self.profiler.start()

    def step_ends(self, step: int) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        if step == self.first + self.num_steps - 1:  # the window's trace was saved by this step()
            self.profiler.stop()
            self.profiler = None

    def close(self) -> None:
        """The run stopped inside the window (preemption, stop_at_step): no partial trace."""
        if self.profiler is not None:
            self.profiler.on_trace_ready = None
            self.profiler.stop()
            self.profiler = None

    def _save(self, profiler: torch.profiler.profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}.pt.trace.json"
        profiler.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=40)
        (self.out_dir / f"rank{self.rank}.ops.txt").write_text(table + "\n")
        if self.rank == 0:  # not print(): Ray Train tees print() into its logger, which shows it twice
            sys.stdout.write(f"profile of {self.out_dir.name.replace('_', ' ')} written to {self.out_dir}\n")
            sys.stdout.flush()
        self.on_saved(trace)
