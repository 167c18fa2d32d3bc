"""cluster/: every file parses; the cluster-launcher YAML passes Ray's own validation; the KubeRay
manifest has the fields KubeRay requires and runs a real entry point with a config that validates;
multi-node runs refuse node-local storage."""

import shlex

import pytest
import yaml

from conftest import REPO
from launcher.storage import check_run_storage, filesystem_type
from lm.config import ConfigError
from test_config import composed
from launcher.schema import to_train_config

CLUSTER = REPO / "cluster"


@pytest.mark.parametrize("name", ["runtime_env.yaml", "aws-gpu.yaml", "rayjob.yaml", "rayservice.yaml", "serve.yaml"])
def test_every_cluster_yaml_parses(name):
    assert isinstance(yaml.safe_load((CLUSTER / name).read_text()), dict)


def test_cluster_launcher_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()))
    validate_config(config)  # what `ray up` runs
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-e ." in setup and "--no-build-isolation" in setup
    assert all("RAY_AUTH_MODE=" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
               if c.strip().startswith("RAY") or "ray start" in c)


def test_runtime_env_is_accepted_by_ray_and_keeps_the_upload_small():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert {".venv/", ".git/", "outputs/"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


def entrypoint_overrides(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "launcher.train"], "the entrypoint runs this project's trainer"
    assert (REPO / "launcher" / "train.py").exists()
    return argv[3:]


def test_rayjob_has_kuberays_required_fields_and_a_valid_training_config():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group and group["replicas"] >= 1
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    cfg = to_train_config(composed(*entrypoint_overrides(job["spec"]["entrypoint"])))
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["workerGroupSpecs"])
    assert cfg.cluster.use_gpu and cfg.cluster.multi_node and cfg.cluster.num_workers == gpus
    assert cfg.run.storage.startswith("/mnt/shared")


def test_rayservice_runs_the_real_serve_builder_with_arguments_it_accepts():
    import importlib
    import inspect

    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    spec = service["spec"]
    assert "headGroupSpec" in spec["rayClusterConfig"] and spec["rayClusterConfig"]["workerGroupSpecs"]
    for serve_config in (yaml.safe_load(spec["serveConfigV2"]), yaml.safe_load((CLUSTER / "serve.yaml").read_text())):
        ServeDeploySchema.model_validate(serve_config)  # what `serve deploy` and KubeRay check it against
        app = serve_config["applications"][0]
        module, _, name = app["import_path"].partition(":")
        build = getattr(importlib.import_module(module), name)
        documented = inspect.getdoc(build)
        assert all(key in documented for key in app["args"]), "every arg is one the builder documents"
        importlib.import_module(module).check_numbers(app["args"])  # and in the ranges it takes


def test_multi_node_refuses_node_local_storage(tmp_path):
    cfg = to_train_config(composed("cluster=multi_node", f"run.storage={tmp_path}"))
    with pytest.raises(ConfigError, match=r"run.storage=.* is node-local .* cluster.shared_storage=true"):
        check_run_storage(cfg)
    cfg.cluster.shared_storage = True
    check_run_storage(cfg)
    single = to_train_config(composed(f"run.storage={tmp_path}"))
    check_run_storage(single)  # one machine: any local path


def test_filesystem_type_comes_from_the_longest_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\nserver:/export /mnt/shared nfs4 rw 0 0\n")
    assert filesystem_type("/mnt/shared/runs/x", str(mounts)) == "nfs4"
    assert filesystem_type("/mnt/sharedness", str(mounts)) == "ext4"
    assert filesystem_type("/tmp", str(mounts)) == "ext4"


def test_the_grafana_dashboard_charts_every_engine_metric_by_its_exported_name_and_tags():
    """cluster/grafana/lmstack_serving.json against launcher/serve_metrics.py: each expression names
    metrics the replicas export (Ray adds `ray_`; histograms are read through `_bucket`) and groups by
    their tags or Serve's, and every metric has a panel. (The expressions were also checked with a
    PromQL parser, promql-parser 0.12, when written; it is not a test dependency.)"""
    import json
    import re

    from launcher.serve_metrics import EngineMetrics

    dashboard = json.loads((CLUSTER / "grafana" / "lmstack_serving.json").read_text())
    metrics = {m.info["name"]: m for m in vars(EngineMetrics("m", prefix_caching=True)).values()
               if hasattr(m, "info")}
    exported = {f"ray_{name}{'_bucket' if 'boundaries' in m.info else ''}": m for name, m in metrics.items()}
    charted = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\bray_\w+", expr))
            assert names and names <= set(exported), (panel["title"], names - set(exported))
            charted |= names
            tags = set().union(*(exported[n].info["tag_keys"] for n in names))
            grouped = {tag.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for tag in group.split(",")}
            assert grouped <= tags | {"replica", "application", "deployment", "le"}, (panel["title"], grouped)
    assert charted == set(exported), set(exported) - charted
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "model_name", "application"}
