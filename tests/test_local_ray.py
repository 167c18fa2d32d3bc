"""The launchers' settings for Ray still do what they are for in the installed Ray. All are Ray
internals (a raylet flag, a worker setting read from the environment, Ray Train's default callbacks
and scaling policy), so a Ray upgrade that moved one would otherwise only show as slower runs."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


# Run in a fresh process: Ray reads RAY_AUTH_MODE once per process, so setting it here would leave
# this pytest process's later clusters (started without it) unable to talk to their own GCS.
LOCAL_RAY_PROBE = """
import glob, json, os, sys
import ray
from launcher.ray_env import RAY_INIT_IMPORTS, WORKER_ENV, configure_local_ray, import_modules

configure_local_ray()
import_modules(RAY_INIT_IMPORTS)
before = set(sys.modules)
ray.init(num_cpus=2, dashboard_host="127.0.0.1", runtime_env={"env_vars": dict(WORKER_ENV)})  # as the launchers
imported_by_init = sorted(set(sys.modules) - before)
niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
logs = ray._private.worker._global_node.get_logs_dir_path()
workers = [os.path.basename(w) for w in glob.glob(logs + "/worker-*.out")]

from ray.train import RunConfig, ScalingConfig
from launcher.lean_trainer import LeanTorchTrainer

trainer = LeanTorchTrainer(lambda: None, local_ray=True, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(storage_path=os.path.abspath("probe_runs")))
trainer.fit()
actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]

from ray._private import ray_constants
from launcher.ray_env import stop_autoscaler_monitor
monitor = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
stop_autoscaler_monitor()
print(json.dumps({"niceness": niceness, "workers": workers, "named_actors": actors,
                  "imported_by_init": imported_by_init, "monitor_exit_code": monitor.poll()}))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def local_ray_probe(tmp_path_factory) -> dict:
    """A local Ray as the launchers start it, and a Ray Train run of an empty function on it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_prestart_worker_first_driver")}
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE], cwd=tmp_path_factory.mktemp("probe"),
                         env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_local_ray_runs_workers_at_normal_priority_and_prestarts_none(local_ray_probe):
    probe = local_ray_probe
    assert probe["niceness"] == 0
    # A worker prestarted for the first driver, never leased to its job, keeps the nil job id in its
    # log's name (Ray's default starts one per CPU).
    assert probe["workers"] and not [w for w in probe["workers"] if "-ffffffff-" in w], probe["workers"]


def test_lean_trainer_drops_the_dataset_manager_and_on_its_own_ray_the_placement_group_cleaner():
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from launcher.controller_parts import ImportTorchWhileWorkersStart
    from launcher.lean_trainer import LeanTorchTrainer

    def callback_types(local_ray: bool) -> set[type]:
        trainer = LeanTorchTrainer(lambda: None, local_ray=local_ray, scaling_config=ScalingConfig(num_workers=1))
        return {type(c) for c in trainer._create_default_callbacks()}

    local, cluster = callback_types(local_ray=True), callback_types(local_ray=False)
    assert DatasetsCallback not in local | cluster
    assert PlacementGroupCleanerCallback in cluster
    # nothing else is dropped; the one added imports torch in the controller while the workers start
    assert local == cluster - {PlacementGroupCleanerCallback} | {ImportTorchWhileWorkersStart}


def test_lean_trainer_on_its_own_ray_starts_no_autoscaling_coordinator(local_ray_probe):
    # Ray Data's coordinator is a detached actor named "AutoscalingCoordinator"; Ray's own fixed-size
    # policy starts it for every run, before the workers.
    assert "AutoscalingCoordinator" not in local_ray_probe["named_actors"], local_ray_probe["named_actors"]


def test_fixed_scaling_without_autoscaler_still_sizes_the_worker_group():
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision

    from launcher.controller_parts import FixedScalingWithoutAutoscaler, local_scaling_policy

    policy = local_scaling_policy(FixedScalingPolicy(ScalingConfig(num_workers=3, resources_per_worker={"CPU": 1})))
    assert type(policy) is FixedScalingWithoutAutoscaler
    policy.after_controller_start(None)  # Ray's own would create the coordinator here
    assert policy.make_decision_for_non_running_worker_group() == ResizeDecision(num_workers=3,
                                                                                resources_per_worker={"CPU": 1})


def test_ray_init_imports_nothing_beyond_what_the_launcher_imports_first(local_ray_probe):
    # launcher.ray_env.init_local_ray imports Ray Train in a second thread while ray.init runs; two
    # threads importing the same package at once can deadlock on a circular import.
    assert local_ray_probe["imported_by_init"] == []


UNPICKLE_PROBE = """
import pickle, sys
pickle.loads(sys.stdin.buffer.read())
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


@pytest.mark.parametrize("local_ray", [True, False])
def test_what_train_hands_its_controller_imports_torch_only_off_a_cluster_after_the_workers(local_ray):
    # Ray Train's controller is a fresh process that imports what it unpickles. Ray's TorchConfig
    # imports torch (~1.2 s), before the controller starts the workers. On the launcher's own Ray the
    # controller gets a torch-free equivalent and imports torch on a thread while the workers start.
    from ray import cloudpickle
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

    from launcher.controller_parts import ImportTorchWhileWorkersStart, local_scaling_policy
    from launcher.lean_trainer import LeanTorchTrainer

    trainer = LeanTorchTrainer(lambda: None, local_ray=local_ray, scaling_config=ScalingConfig(num_workers=1))
    callbacks = trainer._create_default_callbacks()
    assert any(isinstance(c, ImportTorchWhileWorkersStart) for c in callbacks) == local_ray
    handed = cloudpickle.dumps({"train_run_context": trainer.train_run_context, "callbacks": callbacks,
                                "scaling_policy": local_scaling_policy(create_scaling_policy(trainer.scaling_config))})
    out = subprocess.run([sys.executable, "-c", UNPICKLE_PROBE], input=handed, capture_output=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.decode()
    assert (out.strip() == "[]") == local_ray, out


def test_the_autoscaler_monitor_can_be_stopped_before_rays_shutdown(local_ray_probe):
    # Ray's shutdown stops the GCS first; the monitor's SIGTERM handler then waits on it until Ray
    # kills the monitor 1 s later. launcher.ray_env stops it first, at exit, with Ray's own method.
    assert local_ray_probe["monitor_exit_code"] is not None
