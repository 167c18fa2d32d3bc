"""What `LeanTorchTrainer` hands Ray Train's controller on the launcher's own Ray. Imports no torch.

The controller is a fresh process that imports whatever it unpickles. Ray's `TorchConfig` lives in
a module that imports torch (~1.2 s on 2 cores), and the controller unpickles it before it asks for
the workers, so every run's workers started that much later. `TorchConfigImportedLater` is the
same configuration whose module imports no torch; the controller imports Ray's torch backend on a
thread while the workers' processes start (it only waits for them then), and uses it unchanged once
they are up. Measured: the controller asks for the workers 1.2 s sooner; on 2 cores the worker group
is up ~0.45 s sooner, since the two processes then import torch at once (benchmarks/RESULTS.md).
Everything here is a Ray Train internal: `lean_trainer` keeps Ray's own classes where a
Ray version has moved one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

from ray.train.backend import Backend, BackendConfig

try:
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    from ray.train.v2._internal.util import TrainingFramework
except ImportError:  # a Ray version that moved them: LeanTorchTrainer then uses Ray's own classes
    FixedScalingPolicy = WorkerGroupCallback = TrainingFramework = None
TRAIN_INTERNALS_FOUND = FixedScalingPolicy is not None

RAY_TORCH_BACKEND = "ray.train.torch.config"  # Ray's TorchConfig and _TorchBackend; imports torch


def _ray_torch_config(config: "TorchConfigImportedLater"):
    from ray.train.torch.config import TorchConfig

    return TorchConfig(backend=config.backend, init_method=config.init_method, timeout_s=config.timeout_s)


class _TorchBackendImportedLater(Backend):
    """Ray's `_TorchBackend` (process group set-up and teardown on the workers), imported when first used."""

    share_cuda_visible_devices = True  # as Ray's torch backend

    @staticmethod
    def _ray_backend():
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend()

    def on_start(self, worker_group, backend_config) -> None:
        self._ray_backend().on_start(worker_group, _ray_torch_config(backend_config))

    def on_training_start(self, worker_group, backend_config) -> None:
        self._ray_backend().on_training_start(worker_group, _ray_torch_config(backend_config))

    def on_shutdown(self, worker_group, backend_config) -> None:
        self._ray_backend().on_shutdown(worker_group, _ray_torch_config(backend_config))


@dataclass
class TorchConfigImportedLater(BackendConfig):
    """Ray's `TorchConfig` (same fields and backend), from a module that does not import torch."""

    backend: Optional[str] = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _TorchBackendImportedLater

    @property
    def train_func_context(self):  # read on the driver; the workers run it
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


if TRAIN_INTERNALS_FOUND:
    class ImportTorchWhileWorkersStart(WorkerGroupCallback):
        """In the controller: import Ray's torch backend while it waits for the workers' processes."""

        def before_worker_group_start(self, worker_group_context) -> None:
            threading.Thread(target=__import__, args=(RAY_TORCH_BACKEND,), name="import-torch-backend",
                             daemon=True).start()

    class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
        """Ray Train's fixed-size policy that asks no autoscaler for resources (there is none)."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass


def local_scaling_policy(policy):
    """`policy` without its autoscaler requests, where it is Ray's fixed-size one; else `policy`."""
    if not TRAIN_INTERNALS_FOUND or type(policy) is not FixedScalingPolicy:
        return policy
    return FixedScalingWithoutAutoscaler(policy.scaling_config)
