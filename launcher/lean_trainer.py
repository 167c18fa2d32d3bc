"""Ray Train's TorchTrainer without three helper actors that a run of the launcher does not use.

Each Ray process that wakes during a CPU step takes a core from one of the step's OpenMP threads,
and the others wait for it at the next barrier. Stopping the first two actors while the recipe
trained on 2 cores sped its steps up by ~7% (benchmarks/RESULTS.md):
- the dataset manager, which serves Ray Datasets: the launcher passes none (workers read the token
  cache themselves);
- the placement-group cleaner, which asks the dashboard's state API every second whether the
  controller still lives, to free the workers' placement group if it died. Dropped only on the
  launcher's own local Ray: that Ray ends with the driver that owns it, so nothing is left to free.
- the autoscaling coordinator, which passes a run's resource request on to the cluster's
  autoscaler. The launcher's own local Ray is one fixed machine with no autoscaler, and the
  controller waits for the coordinator's process to start before it starts the workers: ~1.2 s of
  every run's start on 2 cores.
On the launcher's own Ray, the controller also gets Ray's torch configuration from a module that
imports no torch, so that it imports torch while the workers start rather than before
(`controller_parts`). A cluster keeps the last two actors and Ray's own configuration.

Ray Train's first Ctrl-C aborts the run (its workers stopped where they are); given `on_interrupt`,
the first Ctrl-C calls that instead (the launcher asks for a checkpoint and a clean stop, as on
SIGTERM) and a second one aborts. All of this is Ray Train internals: where a Ray version has moved
them, the trainer keeps Ray's defaults.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable

from ray.train.torch import TorchTrainer

from launcher import controller_parts  # ImportTorchWhileWorkersStart exists only where Ray has what it needs


def unused_callback_types(has_datasets: bool, local_ray: bool) -> tuple[type, ...]:
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return ()
    return (() if has_datasets else (DatasetsCallback,)) + ((PlacementGroupCleanerCallback,) if local_ray else ())


class LeanTorchTrainer(TorchTrainer):
    """A TorchTrainer; `local_ray`: it runs on a Ray that this process started and will stop."""

    def __init__(self, *args, local_ray: bool, on_interrupt: Callable[[], None] | None = None, **kwargs):
        self.local_ray = local_ray
        self.on_interrupt = on_interrupt
        # The controller then imports torch while the workers start, not before (controller_parts).
        self.torch_imported_later = (local_ray and controller_parts.TRAIN_INTERNALS_FOUND
                                     and "torch_config" not in kwargs)
        if self.torch_imported_later:
            kwargs["torch_config"] = controller_parts.TorchConfigImportedLater()
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        unused = unused_callback_types(bool(self.datasets), self.local_ray)
        callbacks = [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]
        return callbacks + ([controller_parts.ImportTorchWhileWorkersStart()] if self.torch_imported_later else [])

    def _register_sigint_handler(self, controller):
        super()._register_sigint_handler(controller)
        if self.on_interrupt is None:
            return
        abort, interrupted = signal.getsignal(signal.SIGINT), False

        def first_stops_then_aborts(signum, frame):
            nonlocal interrupted
            if not interrupted:
                interrupted = True
                return self.on_interrupt()
            sys.stderr.write("Ctrl-C again: aborting the run now; the same command resumes from its latest checkpoint\n")
            abort(signum, frame)

        signal.signal(signal.SIGINT, first_stops_then_aborts)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.local_ray and "scaling_policy" in controller_init_kwargs:
            policy = controller_init_kwargs["scaling_policy"]
            controller_init_kwargs["scaling_policy"] = controller_parts.local_scaling_policy(policy)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
