"""The launchers' settings for Ray still do what they are for in the installed Ray. All are Ray
internals (a raylet flag, a worker setting read from the environment, Ray Train's default callbacks),
so a Ray upgrade that moved one would otherwise only show as slower runs."""

import json
import os
import subprocess
import sys

from conftest import REPO


# Run in a fresh process: Ray reads RAY_AUTH_MODE once per process, so setting it here would leave
# this pytest process's later clusters (started without it) unable to talk to their own GCS.
LOCAL_RAY_PROBE = """
import glob, json, os
import ray
from launcher.ray_env import WORKER_ENV, configure_local_ray

configure_local_ray()
ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)})
niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
logs = ray._private.worker._global_node.get_logs_dir_path()
print(json.dumps({"niceness": niceness, "workers": [os.path.basename(w) for w in glob.glob(logs + "/worker-*.out")]}))
ray.shutdown()
"""


def test_local_ray_runs_workers_at_normal_priority_and_prestarts_none():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_prestart_worker_first_driver")}
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["niceness"] == 0
    # A worker prestarted for the first driver, never leased to its job, keeps the nil job id in its
    # log's name (Ray's default starts one per CPU).
    assert probe["workers"] and not [w for w in probe["workers"] if "-ffffffff-" in w], probe["workers"]


def test_lean_trainer_drops_the_dataset_manager_and_on_its_own_ray_the_placement_group_cleaner():
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from launcher.lean_trainer import LeanTorchTrainer

    def callback_types(local_ray: bool) -> set[type]:
        trainer = LeanTorchTrainer(lambda: None, local_ray=local_ray, scaling_config=ScalingConfig(num_workers=1))
        return {type(c) for c in trainer._create_default_callbacks()}

    local, cluster = callback_types(local_ray=True), callback_types(local_ray=False)
    assert DatasetsCallback not in local | cluster
    assert PlacementGroupCleanerCallback in cluster
    assert local == cluster - {PlacementGroupCleanerCallback}  # nothing else is dropped
