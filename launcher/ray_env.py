"""Settings for the private local Ray that the launchers start (never for a cluster they join).

Ray starts worker processes at niceness 15, below its own processes (raylet, GCS, dashboard). A CPU
training step is OpenMP regions whose threads meet at a barrier, so whenever a Ray process wakes and
takes a core from one of them, the others wait: 25-30% a step on 2 cores. Serving's ingress,
proxy and model replicas then also lose to the client and Ray's processes (benchmarks/RESULTS.md).
Ray's job manager runs its job supervisor at 0 the same way; the worker applies it itself, so no
privilege is needed. cluster/runtime_env.yaml sets the same for `ray job submit`.
"""

import atexit
import importlib
import os
import threading

WORKER_ENV = {"RAY_worker_niceness": "0"}


def configure_local_ray() -> None:
    """Environment that the raylet and GCS of a Ray started by this process's `ray.init` read.

    - Token auth has nothing to protect on a loopback-only Ray of one process.
    - Ray prestarts one idle worker per CPU for the first driver, without the job's runtime
      environment. Every task and actor here has one (the job's, Train's, Serve's), so none ever
      uses them: two Python processes importing Ray on 2 cores while the run starts, ~1.5 s before
      Train's worker group is up (benchmarks/RESULTS.md).
    A value the user set wins.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


# What `ray.init` imports on first use when it starts a local Ray (Ray 2.60; `python -X importtime`).
# Imported before it runs beside `import_meanwhile`, so that the two threads never import at once.
RAY_INIT_IMPORTS = ("ray._private.runtime_env.uv_runtime_env_hook", "ray._common.usage.usage_lib",
                    "ray.autoscaler.v2.utils", "ray.dashboard.optional_deps", "ray._private.thirdparty.pynvml")


def import_modules(names) -> None:
    """Import what can be imported; a module that fails raises again where it is imported for use."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass


def stop_autoscaler_monitor() -> None:
    """Stop the autoscaler's monitor of the Ray this process started, now (SIGKILL).

    Ray's shutdown at exit stops the GCS before the monitor, whose SIGTERM handler then reports its
    end to the gone GCS until Ray kills it a second later: 1 s of every launcher's exit. A Ray of
    this process's own has nothing for the monitor to scale, and Ray would kill it anyway.
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if ray.is_initialized() and node is not None and hasattr(node, "kill_monitor"):
        node.kill_monitor(check_alive=False)


def init_local_ray(import_meanwhile=(), **init_kwargs) -> None:
    """`ray.init(**init_kwargs)` for a Ray of this process's own, while a thread imports `import_meanwhile`.

    Starting a local Ray takes ~3.5 s, nearly all of it waiting for its processes (the dashboard,
    then the raylet and its agents) to come up; the driver then imports Ray Train and torch for
    ~1.8 s. Done together, Train's workers are up ~0.5 s sooner on 2 cores (benchmarks/RESULTS.md).
    `ray.init` itself stays on the main thread: run from another one, the driver's later calls to
    the GCS hung.
    """
    configure_local_ray()
    import ray

    import_modules(RAY_INIT_IMPORTS)
    importer = threading.Thread(target=import_modules, args=(tuple(import_meanwhile),),
                                name="import-while-ray-starts", daemon=True)
    importer.start()
    try:
        ray.init(**init_kwargs)
    finally:
        importer.join()
    atexit.register(stop_autoscaler_monitor)  # runs before Ray's own shutdown, registered earlier
