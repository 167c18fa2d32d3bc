"""Train a GPT: Hydra composes and validates the config, the driver prepares the token cache,
Ray Train runs DeepSpeed workers, and the run ends with summary.json, a checkpoint and a sample.

    python -m launcher.train model=tiny deepspeed=zero3 cluster.num_workers=2 trainer.max_steps=50
    python -m launcher.train -m optim.lr=3e-4,1e-3 model=tiny      # a sweep, one run per job

Rerunning the same command (same run.name) resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from launcher.preemption import CTRL_C, StopOnSignal
from launcher.ray_env import WORKER_ENV, init_local_ray
from launcher.schema import CONF_DIR, absolute, check_command_line, fail, register_schema, to_train_config
from launcher.run_dir import RunDir
from launcher.storage import check_run_storage
from launcher.wandb_logger import (check_credentials as check_wandb_credentials, check_server as check_wandb_server,
                                     copies_offline_run, offline_copy)
from lm.config import (ConfigError, RopeScalingConfig, TrainConfig, config_to_dict, global_batch_size,
                       padded_vocab_size, sequence_length, validate)
from lm.checkpoint import check_resumable
from lm.run_lock import training_lock

CONFIG_GROUPS = ("model", "data", "deepspeed", "cluster", "logging", "experiment")
# Settings that do not change what is trained, so they do not change the derived run name.
_NAME_EXCLUDES = {"run", "logging", "cluster.address", "cluster.max_failures", "cluster.min_workers",
                  "cluster.resize_interval_s",
                  "cluster.placement_strategy", "cluster.include_dashboard",
                  "trainer.stop_at_step", "trainer.keep_checkpoints", "trainer.sample_tokens",
                  "trainer.log_every", "trainer.compile", "trainer.profile_at", "trainer.profile_steps",
                  "data.cache_dir"}
# Settings added after run names were first derived: at these values they leave the name as it was,
# so a run started before the setting existed still resumes under the same command.
_NAME_UNCHANGED_AT = {"model.activation": "gelu_tanh", "data.val_path": None, "optim.schedule": "cosine",
                      "data.weights": None, "model.n_kv_head": None, "model.qkv_bias": None,
                      "data.chat_template": "auto",
                      "model.rope_scaling": dataclasses.asdict(RopeScalingConfig())}


def derive_run_name(cfg: TrainConfig) -> str:
    """<model>-<hash>: the same command finds the same run (and resumes it), another config a new one."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        if section in _NAME_EXCLUDES:
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            unchanged = name in _NAME_UNCHANGED_AT and _NAME_UNCHANGED_AT[name] == value
            if name not in _NAME_EXCLUDES and not unchanged:
                flat[name] = value
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.model.name}-{digest}"


def joins_cluster(cfg: TrainConfig) -> bool:
    """True: the run goes to a Ray cluster; False: the launcher starts (and stops) a Ray of its own."""
    return bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def check_gpu_request(cfg: TrainConfig) -> None:
    if cfg.cluster.use_gpu and not joins_cluster(cfg):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("cluster.use_gpu=true is invalid: this machine has no CUDA GPU; allowed: "
                              "false here, or cluster.address=<a Ray cluster with GPUs>")


def sweep_group() -> str | None:
    """Jobs of one Hydra multirun share a W&B group named after the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return "sweep-" + Path(hc.sweep.dir).name
    return None


def start_ray(cfg: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return  # later jobs of a multirun reuse the cluster
    if joins_cluster(cfg):
        ray.init(address=cfg.cluster.address or None)
    else:
        repo = str(Path(__file__).resolve().parent.parent)
        need = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
        # The dashboard is on (127.0.0.1) unless cluster.include_dashboard=false: `ray.init` waits 1-2 s
        # for its process to come up before it starts the raylet, and its processes then share the
        # cores with the workers' start (3-5 s a run in all on a 2-vCPU VM; benchmarks/RESULTS.md).
        # Ray Train's preemption watcher (an extra actor process) is for cloud nodes being drained;
        # this one machine has none, and SIGTERM is handled by StopOnSignal.
        # Train's controller acts on a worker group's changes (started, finished) only when it next
        # polls it, every 2 s by default: ~2.5 s of every run's start and end on one machine. Polling a
        # few local workers 4 times a second costs nothing measurable (benchmarks/RESULTS.md).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        init_local_ray(import_meanwhile=FIT_IMPORTS, num_cpus=max(os.cpu_count() or 1, need),
                       include_dashboard=cfg.cluster.include_dashboard, dashboard_host="127.0.0.1",
                       runtime_env={"env_vars": {"PYTHONPATH": repo, "RAY_USAGE_STATS_ENABLED": "0",
                                                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", **WORKER_ENV}})


def worker_count(c) -> int | tuple[int, int]:
    """Ray Train's `num_workers`: a fixed count, or (min, max) for an elastic worker group."""
    return (c.min_workers, c.num_workers) if c.min_workers and c.min_workers < c.num_workers else c.num_workers


FIT_IMPORTS = ("ray.train.torch", "launcher.lean_trainer", "launcher.ray_worker")  # what fit() imports


def fit(cfg: TrainConfig, dataset_dir: str, on_interrupt=None) -> dict:
    """The run through Ray Train; its final metrics. `on_interrupt`: called on the first Ctrl-C, which
    otherwise aborts the run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from launcher.lean_trainer import LeanTorchTrainer
    from launcher.ray_worker import train_loop_per_worker

    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
    trainer = LeanTorchTrainer(
        train_loop_per_worker, local_ray=not joins_cluster(cfg), on_interrupt=on_interrupt,
        train_loop_config={"config": config_to_dict(cfg), "dataset_dir": dataset_dir,
                           "wandb_group": sweep_group()},
        scaling_config=ScalingConfig(num_workers=worker_count(c), use_gpu=c.use_gpu,
                                     resources_per_worker=resources, placement_strategy=c.placement_strategy,
                                     elastic_resize_monitor_interval_s=c.resize_interval_s),
        run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage,
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints)),
    )
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit().metrics or {}
    finally:  # Ray Train's Ctrl-C handler (and ours, LeanTorchTrainer's) would outlive the run
        signal.signal(signal.SIGINT, previous)


def sample_text(run_dir: RunDir, checkpoint: str, num_tokens: int, seed: int) -> str:
    """A sample from the trained model, started where a new document starts."""
    import tempfile

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation imports deepspeed
    from lm.checkpoint import load_model
    from lm.tokenizer import document_start

    with tempfile.TemporaryDirectory(prefix="lmstack-sample-") as cache:  # used only for an object store
        model, tokenizer, _ = load_model(run_dir.local_copy(checkpoint, cache))
    prompt = document_start(tokenizer)
    out = model.generate(torch.tensor([prompt]), num_tokens, temperature=0.8, top_k=50,
                         generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out[0, len(prompt):].tolist())


def explicit_model_fields(overrides: list[str]) -> set[str]:
    """Model fields the command line sets (`model.n_embd=...`; `model=<option>` sets them all)."""
    from lm.config import ModelConfig

    fields: set[str] = set()
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key == "model":
            fields.update(f.name for f in dataclasses.fields(ModelConfig))
        elif key.startswith("model."):
            fields.add(key.removeprefix("model."))
    return fields


def apply_init_from(cfg: TrainConfig, explicit_model: set[str]):
    """Fine-tuning: the architecture comes from trainer.init_from; then the whole config is validated.
    Returns the pretrained source, or None when training from scratch."""
    from lm.pretrained import apply_pretrained_architecture, inspect_pretrained
    from lm.remote_files import is_uri

    source = None
    if cfg.trainer.init_from:
        source = inspect_pretrained(cfg.trainer.init_from)
        if not is_uri(cfg.trainer.init_from):  # a URI stays one: each node mirrors it for itself
            cfg.trainer.init_from = str(source.path)
        cfg.model = apply_pretrained_architecture(cfg.model, source, explicit_model)
    validate(cfg)
    return source


def prepare_dataset(cfg: TrainConfig, tokenizer=None):
    """Build or reuse the token cache on the driver; the model's vocabulary follows the tokenizer
    (or, fine-tuning, the pretrained model's embedding must hold the given tokenizer's ids)."""
    from lm.data import prepare_data

    prepared = prepare_data(cfg.data, tokenizer=tokenizer, seq_len=sequence_length(cfg))
    needed = sequence_length(cfg) + 1
    val = ("data.val_path", cfg.data.val_path) if cfg.data.val_path else ("data.val_fraction", cfg.data.val_fraction)
    for split, (field, value) in (("train", ("data.path", cfg.data.path)), ("val", val)):
        tokens = prepared.meta[f"{split}_tokens"]
        if tokens < needed:
            raise ConfigError(f"{field}={value!r}: the {split} split has {tokens} tokens, fewer than one "
                              f"sequence ({needed}); use more text or a smaller data.block_size")
    for source in prepared.meta.get("sources", []):  # a mixture's: each is sampled on its own
        if source["train_tokens"] < needed:
            raise ConfigError(f"data.path={cfg.data.path!r}: its source {source['path']!r} has {source['train_tokens']} "
                              f"training tokens, fewer than one sequence ({needed}); drop it or add text")
        if not cfg.data.val_path and source["val_tokens"] < needed:
            raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: the validation tail of source "
                              f"{source['path']!r} has {source['val_tokens']} tokens, fewer than one sequence "
                              f"({needed}); raise it, add text, or give data.val_path")
    if tokenizer is None:
        cfg.model.vocab_size = padded_vocab_size(prepared.meta["vocab_size"])
    elif prepared.meta["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"trainer.init_from={cfg.trainer.init_from!r}: its tokenizer has {prepared.meta['vocab_size']} "
                          f"tokens but the model embeds only {cfg.model.vocab_size}")
    return prepared


def latest_resumable_checkpoint(cfg: TrainConfig, run_dir: RunDir) -> str | None:
    """The run's latest checkpoint, after checking this config can continue it."""
    latest = run_dir.latest_checkpoint()
    if latest is not None:
        saved = run_dir.config(latest)
        check_resumable(cfg, latest, saved, lambda: run_dir.damaged_file(latest), run_dir.where)
        print(f"resuming run {cfg.run.name} from {run_dir.where(latest)}", flush=True)
        if saved.cluster.num_workers != cfg.cluster.num_workers:
            print(f"  written by {saved.cluster.num_workers} workers, resumed on {cfg.cluster.num_workers}: state that "
                  "ZeRO partitioned by rank is resharded (DeepSpeed's universal checkpoint, written once beside it); "
                  f"{global_batch_size(saved)} -> {global_batch_size(cfg)} sequences per step"
                  + ("" if global_batch_size(saved) == global_batch_size(cfg) else
                     " (trainer.micro_batch_size or trainer.grad_accum keep it, and the run's course with it)"),
                  flush=True)
    return latest


def wandb_outcome(run_dir: Path, mode: str) -> str:
    """Where the W&B run is, and for an offline one the command that uploads it: every directory of
    its id, since each start of a resumed run writes one (`wandb sync` sends them in order, as one run)."""
    if mode != "offline":
        return f"{run_dir}  ({mode})"
    parts = run_dir.parent / f"offline-run-*-{run_dir.name.rsplit('-', 1)[-1]}"
    return f"{run_dir}  (offline; `wandb sync {parts}` uploads it)"


def print_outcome(cfg: TrainConfig, run_dir: RunDir, final: str, summary: dict, summary_path: str) -> None:
    print(f"\ncheckpoint: {summary['checkpoint']}\nsummary:    {summary_path}", flush=True)
    if summary["wandb_dir"]:
        print(f"W&B run:    {wandb_outcome(Path(summary['wandb_dir']), cfg.logging.mode)}", flush=True)
    if summary.get("wandb_copy"):
        print(f"            copied to {summary['wandb_copy']}  (rank 0's node may be gone: sync this copy, "
              f"downloaded first if it is in a bucket)", flush=True)
    t = cfg.trainer
    if t.profile_at:
        from lm.profiling import trace_dir  # imports torch: only when asked

        profile = trace_dir("", t.profile_at, t.profile_steps).as_posix()
        if run_dir.exists(profile):
            print(f"profile:    {run_dir.where(profile)}  (rank<r>.pt.trace.json: https://ui.perfetto.dev; "
                  "rank<r>.ops.txt)", flush=True)
    shown = {"val_loss": ".4f", "val_perplexity": ".2f", "val_accuracy": ".3f", "tokens_per_second": ".0f",
             "mfu": ".1%"}
    print(" ".join(f"{k}={summary[k]:{f}}" for k, f in shown.items() if summary.get(k) is not None)
          + (f" precision={summary['precision']}" if summary.get("precision") else ""), flush=True)
    if cfg.trainer.sample_tokens:
        sample = sample_text(run_dir, final, cfg.trainer.sample_tokens, cfg.trainer.seed)
        print(f"sample:\n{'-' * 60}\n{sample}\n{'-' * 60}", flush=True)


def run(cfg: TrainConfig, source=None) -> dict:
    """Everything after validation: data, Ray, summary, sample. Returns the summary.
    `source`: the pretrained model a fine-tune starts from (`apply_init_from`)."""
    from launcher.summary import build_summary, previous_wandb_dir, write_summary

    started = time.time()
    cfg.run.storage = absolute(cfg.run.storage)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.logging.dir = absolute(cfg.logging.dir)
    check_run_storage(cfg)
    cfg.run.name = cfg.run.name or derive_run_name(cfg)
    run_dir = RunDir(cfg.run.storage, cfg.run.name)

    prepared = prepare_dataset(cfg, source.tokenizer() if source else None)
    latest = latest_resumable_checkpoint(cfg, run_dir)  # the workers resume from it
    # held before anything in the run directory is changed
    with training_lock(run_dir.path, cfg.run.name, remote=run_dir.remote):
        if why := run_dir.reconcile_ray_snapshot():
            print(f"removed Ray Train's list of this run's checkpoints ({why}): the checkpoints in "
                  f"{run_dir.where()} are what the run resumes from", flush=True)
        print(f"run {cfg.run.name}: {run_dir.where()}", flush=True)

        metrics, stopped_by = {}, None
        if latest and (step := run_dir.trainer_state(latest)["step"]) >= cfg.trainer.max_steps:
            print(f"run {cfg.run.name} is at step {step}, trainer.max_steps={cfg.trainer.max_steps}: nothing to train",
                  flush=True)  # no Ray to start
        else:
            start_ray(cfg)
            stop = StopOnSignal(run_dir)
            stop.install()
            metrics = fit(cfg, str(prepared.directory), on_interrupt=lambda: stop.request(CTRL_C))
            stopped_by = stop.requested
            if stopped_by:
                stop.clear()
        final = run_dir.latest_checkpoint()
        if stopped_by:
            print(f"stopped by {stopped_by} at step {run_dir.trainer_state(final)['step']} of {cfg.trainer.max_steps}; "
                  "rerun the same command to continue", flush=True)
        wandb_dir = metrics.get("wandb_dir") or previous_wandb_dir(run_dir)
        copied = offline_copy(wandb_dir) if wandb_dir and copies_offline_run(cfg) else None
        summary = build_summary(run_dir, final, time.time() - started, prepared.meta["vocab_size"], wandb_dir,
                                config_to_dict(cfg), run_dir.where(copied) if copied and run_dir.exists(copied) else None)
        print_outcome(cfg, run_dir, final, summary, write_summary(run_dir, summary))
        if stopped_by == CTRL_C:
            sys.exit(130)  # interrupted, as shells report it; a multirun sweep ends here too, as on Ray's abort
        return summary


def check_sweep_jobs(argv: list[str]) -> None:
    """A `-m` sweep's jobs, each composed and validated before the first starts: a bad value in its
    third job fails now, in one line, rather than after two jobs have trained. Hydra's basic sweeper
    only (the one that expands command-line lists); fine-tunes are checked as each job starts, since
    their architecture comes from the pretrained model."""
    flags = {a for a in argv if a.startswith("-")}
    if not flags & {"-m", "--multirun"} or flags - {"-m", "--multirun"} or \
            any(a.startswith("hydra/sweeper=") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    if len(jobs) < 2:
        return
    named: dict[tuple[str, str], tuple[int, str]] = {}  # (storage, run.name) -> (first job, what it trains)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for number, job in enumerate(jobs):
            try:
                cfg = to_train_config(compose(config_name="config", overrides=job), check=False)
            except Exception:  # what Hydra refuses (a deletion, a missing value) it reports itself
                return
            if not cfg.trainer.init_from:
                try:
                    validate(cfg)
                except ConfigError as error:
                    raise ConfigError(f"{error} (in sweep job #{number} of {len(jobs)}; no job was started)") from None
            if cfg.run.name:  # jobs training differently under one name: each would resume the one before
                trains = derive_run_name(cfg)
                first, first_trains = named.setdefault((absolute(cfg.run.storage), cfg.run.name), (number, trains))
                if trains != first_trains:
                    raise ConfigError(f"run.name={cfg.run.name!r} names sweep jobs #{first} and #{number}, which train "
                                      "differently: the second would resume the first's finished run; leave run.name out "
                                      "(each job's name then comes from what it trains) or name what varies, e.g. "
                                      "'run.name=mine-lr${optim.lr}'; no job was started")


register_schema()


@hydra.main(config_path="../hydra_conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        cfg = to_train_config(dcfg, check=False)
        source = apply_init_from(cfg, explicit_model_fields(list(HydraConfig.get().overrides.task)))
        check_gpu_request(cfg)
        if not joins_cluster(cfg):  # on a cluster, rank 0's node may hold a key the driver's does not
            check_wandb_credentials(cfg.logging)
            check_wandb_server(cfg.logging)
        return run(cfg, source)
    except ConfigError as error:
        fail(error)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    check_command_line(TrainConfig, CONFIG_GROUPS)
    try:
        check_sweep_jobs(sys.argv[1:])
    except ConfigError as error:
        fail(error)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the run (before it starts, or after): no traceback
        sys.stderr.write("interrupted (Ctrl-C); the same command resumes from the run's latest checkpoint, "
                         "if it has one\n")
        sys.exit(130)
    # Exit without the interpreter's last collections walking every object torch and Ray made
    # (~0.7 s); nothing left needs them collected (Ray's shutdown still runs at exit).
    gc.freeze()
