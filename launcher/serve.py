"""Serve an export over HTTP with Ray Serve (blocks until Ctrl-C, or the SIGTERM that `docker stop`,
Kubernetes and systemd send: either lets the requests in flight finish, then shuts Serve and its local
Ray down and exits 0):

    python -m launcher.serve run.name=<run> serve.port=8000
"""

from __future__ import annotations

import os
import signal
import socket
import time

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launcher.ray_env import WORKER_ENV, configure_local_ray, stop_autoscaler_monitor
from launcher.run_dir import is_uri
from launcher.schema import check_command_line, fail
from launcher.storage import check_object_store
from lm.config import ConfigError, ServeAppConfig

ConfigStore.instance().store(name="serve_schema", node=ServeAppConfig)


def builder_args(cfg: ServeAppConfig) -> dict:
    s = cfg.serve
    if not 0 < s.port < 65536:
        raise ConfigError(f"serve.port={s.port} is invalid: must be in 1..65535")
    if s.metrics_port is not None and not 0 < s.metrics_port < 65536:
        raise ConfigError(f"serve.metrics_port={s.metrics_port} is invalid: must be in 1..65535, or null for a free port")
    if not s.graceful_shutdown_timeout_s >= 0:
        raise ConfigError(f"serve.graceful_shutdown_timeout_s={s.graceful_shutdown_timeout_s} is invalid: must be "
                          "a number of seconds >= 0")
    for field, location in (("run.storage", cfg.run.storage), ("serve.export_dir", s.export_dir)):
        if location and is_uri(location):
            check_object_store(location, field)
    return {"export_dir": s.export_dir, "run_name": cfg.run.name, "storage": cfg.run.storage,
            "api_key": s.api_key, "num_replicas": s.num_replicas, "autoscaling": s.autoscaling,
            "max_batch_size": s.max_batch_size, "cpus_per_replica": s.cpus_per_replica,
            "gpus_per_replica": s.gpus_per_replica, "stream_interval_ms": s.stream_interval_ms,
            "stream_events_per_s": s.stream_events_per_s, "compile": s.compile, "max_model_len": s.max_model_len,
            "dtype": s.dtype, "generation_config": s.generation_config,
            "prefix_cache_tokens": s.prefix_cache_tokens if s.enable_prefix_caching else 0,
            "max_num_batched_tokens": s.max_num_batched_tokens, "request_router": s.request_router}


def check_port_free(host: str, port: int, field: str) -> None:
    """A port in use (a `make serve` still running) failed in Serve's proxy, with a traceback a second,
    after Ray had started: one line first. Bound as uvicorn binds (SO_REUSEADDR: a port a server just
    left, in TIME_WAIT, is free)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"{field}={port} is invalid: {host}:{port} is in use ({error.strerror}); stop what "
                              f"listens there (a `make serve` still running?) or choose another {field}") from None


@hydra.main(config_path="../hydra_conf", config_name="serve", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg: ServeAppConfig = OmegaConf.to_object(dcfg)
    try:
        args = builder_args(cfg)
        check_port_free(cfg.serve.host, cfg.serve.port, "serve.port")
        if cfg.serve.metrics_port is not None:
            check_port_free("127.0.0.1", cfg.serve.metrics_port, "serve.metrics_port")
        from launcher.serve_app import build

        app = build(args)
    except (ConfigError, FileNotFoundError) as error:
        fail(error)
    import ray
    from ray import serve

    configure_local_ray()
    context = ray.init(num_cpus=max(os.cpu_count() or 1, cfg.serve.num_replicas * cfg.serve.cpus_per_replica),
                       include_dashboard=cfg.serve.include_dashboard, dashboard_host="127.0.0.1",
                       runtime_env={"env_vars": dict(WORKER_ENV)}, _metrics_export_port=cfg.serve.metrics_port)
    if cfg.serve.gpus_per_replica > 0 and not ray.cluster_resources().get("GPU"):
        ray.shutdown()
        fail(ConfigError(f"serve.gpus_per_replica={cfg.serve.gpus_per_replica} is invalid: this machine has no GPU; "
                         "allowed: 0 here"))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name="lm", route_prefix="/")
    metrics_port = ray.nodes()[0]["MetricsExportPort"]
    print(f"Prometheus metrics (Ray's, Serve's and the engine's ray_lm_*) on http://127.0.0.1:{metrics_port}/metrics",
          flush=True)
    if context.dashboard_url:
        print(f"Ray dashboard on {serve_status_command(context.dashboard_url)}", flush=True)
    print(f"OpenAI-compatible API on http://{cfg.serve.host}:{cfg.serve.port}/v1 (Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # replaces Ray's, which dumps a stack and exits at once
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends it at once
        finish_requests_in_flight(cfg.serve.graceful_shutdown_timeout_s)
        print("stopping: Ray Serve and its Ray shut down", flush=True)
        serve.shutdown()
        stop_autoscaler_monitor()
        ray.shutdown()


def finish_requests_in_flight(timeout_s: float) -> None:
    """Before Serve shuts down (its proxy closes every connection at once): new requests get a 503 and
    those in flight finish, for at most timeout_s; a second Ctrl-C stops waiting."""
    from ray import serve

    try:
        ingress = serve.get_app_handle("lm")
        left = ingress.drain.remote().result(timeout_s=10)
        if left:
            print(f"stopping: new requests get a 503; waiting up to {timeout_s:g} s for the {left} in flight "
                  "(Ctrl-C: stop now)", flush=True)
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = ingress.requests_in_flight.remote().result(timeout_s=10)
        if left:
            print(f"stopping with {left} requests unfinished after {timeout_s:g} s", flush=True)
    except KeyboardInterrupt:
        print("stopping now", flush=True)
    except Exception as error:  # an ingress that cannot answer: shut down all the same
        print(f"stopping without waiting for requests in flight: {error!r}"[:300], flush=True)


def serve_status_command(dashboard_url: str) -> str:
    """The dashboard's URL and how Serve's CLI reaches it: `serve status` asks localhost:8265 unless told
    otherwise (another Ray's dashboard may hold that port)."""
    address = f"http://{dashboard_url}"
    flag = "" if dashboard_url.endswith(":8265") else f" --address {address}"
    return f"{address} (`serve status{flag}` lists the replicas and their health)"


def _interrupt(signum, frame) -> None:
    """SIGTERM as Ctrl-C."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    check_command_line(ServeAppConfig)
    main()
