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
A cluster keeps the last two. All three are Ray Train internals: where a Ray version has moved
them, the trainer keeps Ray's defaults.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

try:
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
except ImportError:
    FixedScalingPolicy = None


def unused_callback_types(has_datasets: bool, local_ray: bool) -> tuple[type, ...]:
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return ()
    return (() if has_datasets else (DatasetsCallback,)) + ((PlacementGroupCleanerCallback,) if local_ray else ())


if FixedScalingPolicy is not None:
    class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
        """Ray Train's fixed-size policy that asks no autoscaler for resources (there is none)."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass


def local_scaling_policy(policy):
    """`policy` without its autoscaler requests, where it is Ray's fixed-size one; else `policy`."""
    if FixedScalingPolicy is None or type(policy) is not FixedScalingPolicy:
        return policy
    return FixedScalingWithoutAutoscaler(policy.scaling_config)


class LeanTorchTrainer(TorchTrainer):
    """A TorchTrainer; `local_ray`: it runs on a Ray that this process started and will stop."""

    def __init__(self, *args, local_ray: bool, **kwargs):
        self.local_ray = local_ray
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        unused = unused_callback_types(bool(self.datasets), self.local_ray)
        return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.local_ray and "scaling_policy" in controller_init_kwargs:
            controller_init_kwargs["scaling_policy"] = local_scaling_policy(controller_init_kwargs["scaling_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)
