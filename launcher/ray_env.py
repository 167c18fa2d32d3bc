"""Settings for the private local Ray that the launchers start (never for a cluster they join).

Ray starts worker processes at niceness 15, below its own processes (raylet, GCS, dashboard). A CPU
training step is OpenMP regions whose threads meet at a barrier, so whenever a Ray process wakes and
takes a core from one of them, the others wait: 25-30% a step on 2 cores. Serving's ingress,
proxy and model replicas then also lose to the client and Ray's processes (benchmarks/RESULTS.md).
Ray's job manager runs its job supervisor at 0 the same way; the worker applies it itself, so no
privilege is needed. cluster/runtime_env.yaml sets the same for `ray job submit`.
"""

import os

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
