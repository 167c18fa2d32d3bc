"""Shared fixtures: a small real corpus, a token cache built from it, and N-rank process groups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"):  # a developer's own would change the defaults tested
    os.environ.pop(_name, None)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> Path:
    """Compiled decode programs go to this session's own cache, never the user's."""
    path = tmp_path_factory.mktemp("compile-cache")
    os.environ["LMSTACK_COMPILE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def pretrained_cache(tmp_path_factory) -> Path:
    """trainer.init_from URIs are mirrored into this session's own cache, never the user's."""
    path = tmp_path_factory.mktemp("pretrained-cache")
    os.environ["LMSTACK_PRETRAINED_CACHE"] = str(path)
    return path


def upload_directory(local: Path, uri: str) -> str:
    """Every file of a local directory under a URI prefix."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    for path in local.rglob("*"):
        if path.is_file():
            pafs.copy_files(str(path), f"{root}/{path.relative_to(local).as_posix()}", destination_filesystem=fs)
    return uri


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) on loopback; pyarrow, and so Ray Train and every process
    started from here, reach it through the standard AWS variables."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_storage(s3_server, request) -> str:
    """`s3://<a new bucket>/runs` on the local server."""
    import boto3

    bucket = "test-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~400 KB of real Python source from the standard library, as one user text file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["functools.py", "argparse.py", "textwrap.py", "dataclasses.py", "pathlib.py", "json/encoder.py"]
    text = "\n\n".join((stdlib / n).read_text(encoding="utf-8") for n in names)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_train_config(corpus_file, tmp_path_factory):
    """A factory of TrainConfigs for the tiny model on the small corpus (BPE vocab 512)."""
    from lm.config import ClusterConfig, DataConfig, ModelConfig, TrainConfig, TrainerConfig

    cache = tmp_path_factory.mktemp("cache")

    def make(**trainer_overrides) -> TrainConfig:
        cfg = TrainConfig()
        cfg.model = ModelConfig(name="tiny", n_layer=2, n_head=2, n_embd=64, block_size=64)
        cfg.data = DataConfig(name="text", source="files", path=str(corpus_file), vocab_size=512,
                              val_fraction=0.1, cache_dir=str(cache))
        cfg.cluster = ClusterConfig(num_workers=2)
        cfg.trainer = TrainerConfig(**{"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2, "eval_every": 3,
                                       "eval_steps": 2, "ckpt_every": 3, "log_every": 1, **trainer_overrides})
        return cfg

    return make


@pytest.fixture(scope="session")
def prepared_tiny(tiny_train_config):
    from lm.config import padded_vocab_size
    from lm.data import prepare_data

    prepared = prepare_data(tiny_train_config().data, progress=False)
    return prepared, padded_vocab_size(prepared.meta["vocab_size"])


def composed(*overrides: str):
    """hydra_conf/ composed with these command-line overrides, as `python -m launcher.train` would."""
    from hydra import compose, initialize_config_dir

    from launcher.schema import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "hydra_conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def wait_for_checkpoint(run_dir, step: int, proc, timeout: float = 300) -> None:
    """Poll until the run's checkpoint at `step` is complete, while its process `proc` still runs.
    `run_dir`: a local run directory's Path, or a launcher.run_dir.RunDir (an object store's too)."""
    from launcher.run_dir import RunDir

    if isinstance(run_dir, Path):
        run_dir = RunDir(str(run_dir.parent), run_dir.name)
    name = f"checkpoint_{step:06d}"
    deadline = time.time() + timeout
    while not run_dir.is_complete(name):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, f"no {run_dir.where(name)} after {timeout}s"
        time.sleep(0.05 if not run_dir.remote else 0.2)


def interruptible_popen(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen for a command a test sends Ctrl-C (SIGINT) to: the child starts with SIGINT's
    default action, as a terminal's foreground command does, even when this process ignores SIGINT
    (`make test` run in the background): an ignored signal stays ignored across exec, a handled one
    does not."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(*args, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(app, **init_kwargs):
    """A Serve application on a Ray of this process's own, started as `make serve` starts it
    (launcher.ray_env: token auth off, no idle workers prestarted, so two fewer processes on 2 cores
    while the raylet must register within Ray's fixed 30 s); yields the HTTP URL and shuts Serve and
    Ray down after. Ray binds its own ports: a port chosen here could be taken before Ray binds it."""
    import ray
    from ray import serve

    from launcher.ray_env import configure_local_ray, stop_autoscaler_monitor

    configure_local_ray()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, **init_kwargs)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="lm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        stop_autoscaler_monitor()
        ray.shutdown()


def _rank_entry(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    import pickle

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    result = fn(rank, *args)
    with open(os.path.join(out_dir, f"rank_{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if torch.distributed.is_initialized():
        # Leave together and tear the group down before the interpreter does: a gloo group destroyed at
        # exit while its peer is still leaving can abort the process ("terminate called without an
        # active exception"), failing a test whose ranks had all finished.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_on_ranks(fn, world: int, *args, tmp_path: Path) -> list:
    """Run fn(rank, *args) in `world` fresh processes that form a gloo process group (as torchrun)."""
    import pickle

    import torch.multiprocessing as mp

    out = tmp_path / "rank_results"
    out.mkdir(exist_ok=True)
    mp.start_processes(_rank_entry, args=(world, free_port(), fn, args, str(out)), nprocs=world,
                       join=True, start_method="spawn")
    return [pickle.loads((out / f"rank_{r}.pkl").read_bytes()) for r in range(world)]


# name: (variant, ZeRO stage, steps). Short runs compare consolidation across stages (longer
# trajectories drift apart by reduction order); the long run is trained enough for the gate. The
# Llama run has grouped-query attention: one key/value head for its two query heads.
RUNS = {"gpt2-zero0": ("gpt2", 0, 5), "gpt2-zero3": ("gpt2", 3, 5), "gpt2-trained": ("gpt2", 2, 300),
        "llama-gqa-zero2": ("llama", 2, 20)}


def train_runs(rank, cfg_dict, dataset_dir, root):
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    for name, (variant, stage, steps) in RUNS.items():
        cfg = config_from_dict(cfg_dict)
        cfg.model.variant, cfg.model.bias, cfg.deepspeed.zero_stage = variant, variant == "gpt2", stage
        cfg.model.n_kv_head = 1 if variant == "llama" else None
        cfg.trainer.max_steps = cfg.trainer.ckpt_every = cfg.trainer.eval_every = cfg.trainer.log_every = steps
        cfg.run.name = name
        train(cfg, dataset_dir, local_hooks(f"{root}/{name}", rank, keep=1, log=lambda m, s: None))


@pytest.fixture(scope="session")
def trained(tiny_train_config, prepared_tiny, tmp_path_factory):
    """2-rank training runs for the export and serving tests on the small corpus: {name: latest checkpoint}."""
    from lm.checkpoint import find_latest_checkpoint
    from lm.config import config_to_dict

    prepared, vocab = prepared_tiny
    root = tmp_path_factory.mktemp("export_runs")
    # gpt2-trained runs long enough that the blocks matter (after 40 steps, negating every block
    # weight moved perplexity by 0.1%: a gate test on such a model would prove nothing).
    cfg = tiny_train_config(micro_batch_size=4)
    cfg.model.vocab_size, cfg.optim.lr, cfg.optim.warmup_steps = vocab, 3e-3, 20
    cfg.model.block_size, cfg.data.block_size = 256, 64  # room for chat prompts when served; trains on 64
    cfg.run.storage = str(root)
    run_on_ranks(train_runs, 2, config_to_dict(cfg), str(prepared.directory), str(root), tmp_path=root)
    return root, {name: find_latest_checkpoint(root / name) for name in RUNS}, prepared



