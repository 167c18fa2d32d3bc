"""The function Ray Train runs on every worker: bind lm.trainer's hooks to Ray Train and W&B.

Every rank reports to Ray exactly once per checkpoint (Ray Train V2 needs the same number of
reports from every rank), each with its own part of the checkpoint; Ray merges the parts into one
directory in storage. Rank 0 alone talks to W&B.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import sys
import tempfile


# Fault injection for the tests of checkpoint atomicity: "<step>:<rank>:<file>" makes that rank exit
# between writing its part of that step's checkpoint and reporting it to Ray, while <file> exists
# (a test on a cluster it started cannot change its workers' environment between runs).
CRASH_IN_CHECKPOINT_ENV = "LMSTACK_TEST_CRASH_IN_CHECKPOINT"


def crash_requested(step: int, rank: int) -> bool:
    when = os.environ.get(CRASH_IN_CHECKPOINT_ENV, "").split(":", 2)
    return len(when) == 3 and when[:2] == [str(step), str(rank)] and os.path.exists(when[2])


def staging_root(run_name: str) -> str:
    """Where this node's ranks stage their parts of a run's checkpoints before Ray copies them to storage."""
    return os.path.join(tempfile.gettempdir(), "lmstack-staging-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_name))


def train_loop_per_worker(loop_config: dict) -> None:
    if not loop_config["config"]["cluster"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from launcher.preemption import STOP_FILE
    from launcher.run_dir import RunDir
    from lm.checkpoint import load_config, read_trainer_state
    from lm.config import config_from_dict, sequence_length
    from lm.data import prepare_data
    from lm.pretrained import dataset_tokenizer
    from lm.standalone import format_metrics
    from lm.trainer import TrainHooks, train

    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # An elastic group (cluster.min_workers) may run with fewer workers than num_workers; its
    # checkpoints record the count it ran with, which a later group reshards from if it differs.
    cfg.cluster.num_workers = context.get_world_size()
    node = ray.get_runtime_context().get_node_id()
    sys.stdout.write(f"worker rank {rank}/{context.get_world_size()} on node {node}\n")
    dataset_dir = loop_config["dataset_dir"]
    if not os.path.exists(os.path.join(dataset_dir, "meta.json")):
        # A node that cannot see the driver's cache builds the same one (same key) itself.
        dataset_dir = str(prepare_data(cfg.data, progress=False, tokenizer=dataset_tokenizer(cfg),
                                       seq_len=sequence_length(cfg)).directory)

    # Every attempt (the first, and each restart after a lost worker or node) continues from the
    # run's latest complete checkpoint on storage, as rerunning the command would. Not Ray's
    # `get_checkpoint()`: Ray registers a checkpoint only once every rank has reported it, so a
    # group that fails just after writing one would otherwise restart from the one before.
    run_dir = RunDir(cfg.run.storage, cfg.run.name)
    staging = staging_root(cfg.run.name)
    latest = run_dir.latest_checkpoint()
    resume_from = None
    if latest:
        resume_from = restore_copy(run_dir, latest, os.path.join(staging, "restore"), cfg.cluster.num_workers)
    if resume_from and rank == 0:
        written_by = load_config(resume_from).cluster.num_workers
        resharded = f" (written by {written_by} workers: resharded)" if written_by != cfg.cluster.num_workers else ""
        sys.stdout.write(f"worker group resumes from {run_dir.where(latest)}{resharded}\n")

    logger = None
    if rank == 0 and cfg.logging.backend == "wandb":
        from launcher.wandb_logger import WandbLogger, copies_offline_run, offline_copy, remove_import_temporaries

        kept = read_trainer_state(resume_from).get("hooks", {}) if resume_from else {}
        logger = WandbLogger(cfg.logging, cfg.run.name, loop_config.get("wandb_group"), loop_config["config"],
                             run_id=kept.get("wandb_run_id"))

    def log(metrics: dict, step: int) -> None:
        if logger:
            logger.log(metrics, step)
        # Not print(): Ray Train patches it to tee into its logger, which shows every line twice.
        sys.stdout.write(format_metrics(metrics, step) + "\n")
        sys.stdout.flush()

    # A worker killed mid-save (preemption, a lost node, OOM) leaves its staged part behind; the next
    # attempt's same rank on this node removes it before training, so failures do not fill the disk.
    os.makedirs(staging, exist_ok=True)
    for stale in glob.glob(os.path.join(staging, f"ckpt_*_rank{rank}_*")):
        shutil.rmtree(stale, ignore_errors=True)

    def checkpoint_dir(step: int) -> str:
        return tempfile.mkdtemp(prefix=f"ckpt_{step:06d}_rank{rank}_", dir=staging)

    def commit_checkpoint(step: int, path: str, metrics: dict) -> None:
        if crash_requested(step, rank):
            os._exit(17)  # test seam: this rank dies with its part written but never reported
        reported = dict(metrics, step=step, wandb_dir=logger.run_dir if logger else None)
        ray.train.report(reported, checkpoint=Checkpoint.from_directory(path),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")
        shutil.rmtree(path, ignore_errors=True)

    def stop_requested() -> bool:  # asked at log steps; the ranks sum their answers, so rank 0's is enough
        return rank == 0 and run_dir.exists(STOP_FILE)

    # Profiles are written to the run directory, or beside the staged parts and uploaded after.
    local_run_dir = os.path.join(staging, f"run_rank{rank}") if run_dir.remote else run_dir.path
    hooks = TrainHooks(log, checkpoint_dir, commit_checkpoint, str(resume_from) if resume_from else None,
                       stop_requested, run_dir=local_run_dir)
    if logger:
        hooks.started = logger.update_config  # W&B's config then shows what `auto` resolved to
        hooks.resume_state = lambda: {"wandb_run_id": logger.run_id}
        hooks.profiled = logger.log_profile  # rank 0's own trace, as the logger runs on rank 0 only
    try:
        train(cfg, dataset_dir, hooks, device=ray.train.torch.get_device())
        if logger and cfg.logging.log_model:  # train ends with a barrier: every rank's part is in storage
            final = run_dir.latest_checkpoint()
            state = run_dir.trainer_state(final)
            logger.log_model(run_dir.where(final), state["step"],
                             {k: v for k, v in state.get("metrics", {}).items() if isinstance(v, (int, float))})
    finally:
        if logger:
            logger.finish()
            remove_import_temporaries()  # this process ends without atexit hooks, and uses W&B no more
            if copies_offline_run(cfg):
                try:
                    run_dir.upload(logger.run_dir, offline_copy(logger.run_dir))
                except OSError as error:  # the run's outcome stands; the files stay where W&B wrote them
                    print(f"W&B's offline files were not copied to {run_dir.where('wandb')}: {error}; "
                          f"they are in {logger.run_dir} on {socket.gethostname()}", file=sys.stderr, flush=True)
    if run_dir.remote and os.path.isdir(local_run_dir):
        run_dir.upload(local_run_dir, "")  # this rank's profile traces
        shutil.rmtree(local_run_dir, ignore_errors=True)
    # Train ends with a barrier: every rank has loaded what it resumed from and committed its parts.
    if context.get_local_rank() == 0:
        shutil.rmtree(os.path.join(staging, "restore"), ignore_errors=True)
    try:
        os.rmdir(staging)  # once empty
    except OSError:
        pass


def restore_copy(run_dir, checkpoint: str, cache: str, world: int):
    """The checkpoint to resume from as local files: the one in storage on a filesystem; in an object
    store, one download per node, which is also where DeepSpeed's universal form goes when the
    worker count changed (each node converts its own copy: ranks of other nodes cannot see it)."""
    from lm.checkpoint import needs_resharding, write_universal_checkpoint
    from lm.staging import node_lock

    local = run_dir.local_copy(checkpoint, cache)
    if run_dir.remote and needs_resharding(local, world):
        with node_lock(local.with_name(local.name + ".lock")):
            write_universal_checkpoint(local)
    return local
