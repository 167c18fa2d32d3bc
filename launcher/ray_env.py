"""Environment for the Ray workers that the launchers' own local Ray starts.

Ray starts worker processes at niceness 15, below its own processes (raylet, GCS, dashboard). A CPU
training step is OpenMP regions whose threads meet at a barrier, so whenever a Ray process wakes and
takes a core from one of them, the others wait: 25-30% a step on 2 cores. Serving's ingress,
proxy and model replicas then also lose to the client and Ray's processes (benchmarks/RESULTS.md).
Ray's job manager runs its job supervisor at 0 the same way; the worker applies it itself, so no
privilege is needed. cluster/runtime_env.yaml sets the same for `ray job submit`.
"""

WORKER_ENV = {"RAY_worker_niceness": "0"}
