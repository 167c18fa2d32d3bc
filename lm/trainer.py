"""The per-worker training loop: model -> DeepSpeed engine -> steps, evaluation, checkpoints.

It imports no Ray, Hydra or W&B. Metrics and checkpoints leave through `TrainHooks` that the
caller binds (the Ray launcher reports to Ray Train and W&B; `lm.standalone` writes to disk), so
the same loop runs under Ray, under `torchrun`/`deepspeed`, and in tests.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import random
import resource
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lm.checkpoint import (load_config, load_rank_checkpoint, needs_resharding, save_rank_checkpoint,
                           write_part_manifest)
from lm.config import (OptimConfig, TrainConfig, config_to_dict, min_learning_rate, sequence_length,
                       tokens_per_step)
from lm.data import PreparedData
from lm.deepspeed_config import deepspeed_config, trainer_clips_gradients
from lm.host_memory import keep_freed_memory
from lm.mfu import PeakFlops, cpu_has_bf16, mfu, native_bf16, peak_flops
from lm.model import GPT, flops_per_token
from lm.pretrained import load_pretrained
from lm.profiling import StepProfiler
from lm.shard_loader import TokenShardLoader


def _ignore(*args) -> None:
    return None


@dataclass
class TrainHooks:
    """How metrics and checkpoints leave the loop."""

    log: Callable[[dict, int], None] = _ignore  # rank 0 only: (metrics, step)
    checkpoint_dir: Callable[[int], str] = None  # every rank: where to write step N's part
    commit_checkpoint: Callable[[int, str, dict], None] = _ignore  # every rank, after all wrote
    resume_from: Optional[str] = None  # a checkpoint directory to continue from
    # Rank-local "please stop" (preemption): checked at log steps; if any rank asks, every rank
    # checkpoints at that step and returns.
    stop_requested: Callable[[], bool] = lambda: False
    # Rank 0 only, once before the first step: the config as it runs (`auto` values resolved).
    started: Callable[[dict], None] = _ignore
    # Rank 0 only, at each checkpoint: what the hooks want back when the run resumes (the W&B run's
    # id, so a resumed run continues it), kept under "hooks" in trainer_state.json.
    resume_state: Callable[[], dict] = dict
    # The run's directory, which every rank can write: trainer.profile_at's traces go under it
    # (None: no profile). `profiled` hears of each rank's own trace once written.
    run_dir: Optional[str] = None
    profiled: Callable[[Path], None] = _ignore


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then `optim.schedule`: cosine decay from lr to min_lr at max_steps (nanoGPT's
    schedule), linear decay to min_lr, or lr held constant."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / (optim.warmup_steps + 1)
    if optim.schedule == "constant":
        return optim.lr
    min_lr = min_learning_rate(optim)
    if step >= max_steps:
        return min_lr
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    remaining = 1.0 - progress if optim.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + remaining * (optim.lr - min_lr)


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); leave biases and norm gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if _ndim(p) >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if _ndim(p) < 2], "weight_decay": 0.0}]


def _ndim(p: torch.Tensor) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3 partitioned: its full shape


def _numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitioned: its full size


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW with its fused kernel, on CPU as on CUDA: one pass over each tensor instead of
    ~10 elementwise ops per parameter (the default on CPU), 3.5-4.4x faster a step here (RESULTS.md).
    DeepSpeed's own fused Adam would JIT-build a C++ op first (~47 s)."""
    return torch.optim.AdamW(optimizer_param_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def skip_inference_comm_op() -> None:
    """Don't JIT-build DeepSpeed's shared-memory all-reduce (`deepspeed_shm_comm`): its CPU comm backend
    builds it in `init_distributed` (35-60 s on every fresh machine or environment: the build is keyed by
    the include paths), yet only its inference tensor parallelism calls it. Training's collectives go
    through torch.distributed either way. DeepSpeed skips ops marked incompatible, as on machines
    without a compiler, and keeps that table for the process's lifetime."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_without_compiling() -> None:
    """Import DeepSpeed's Muon optimizer with its `torch.compile` decorators made lazy.

    DeepSpeed imports the module in `deepspeed.initialize` and in its ZeRO step (to recognise Muon),
    and the module compiles three functions as it is defined; `torch.compile` imports inductor: 1.2-1.8 s
    per rank at every start (benchmarks/RESULTS.md), for an optimizer this trainer never uses. Imported
    here first with DeepSpeed's `compiler.compile()` swapped for a decorator that compiles on the first
    call, the module is the real one (its classes and functions as DeepSpeed expects them) and Muon, if
    anything ever ran it, would be compiled then. A DeepSpeed without that decorator is left as it is."""
    if MUON_MODULE in sys.modules:
        return
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return
    eager_compile = getattr(compiler, "compile", None)
    if eager_compile is None:
        return

    def compile_on_first_call(*compile_args, **compile_kwargs):
        def decorate(function):
            compiled = None

            @functools.wraps(function)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = eager_compile(*compile_args, **compile_kwargs)(function)
                return compiled(*args, **kwargs)
            return call
        return decorate

    compiler.compile = compile_on_first_call
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:
        pass  # as DeepSpeed itself treats a Muon that cannot be imported
    finally:
        compiler.compile = eager_compile


def init_distributed() -> None:
    """Join the process group that torchrun set up (env vars), or adopt the one Ray Train made.
    Either way DeepSpeed's comm layer learns the world size before `deepspeed.zero.Init` needs it."""
    import deepspeed

    skip_inference_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class _GradNormCatchesOverflow:
    """DeepSpeed's overflow checker without its per-gradient inf/NaN scan, for the bf16 ZeRO-0 wrapper.

    That wrapper (`FP16_UnfusedOptimizer`) scans every gradient, then computes the gradient norm and
    skips the step when the norm is not finite, which any inf or NaN gradient makes it. The scan only
    feeds fp16's loss scale; bf16 has none (its static scale is 1), so the norm alone skips the same
    steps. The scan is ~0.9 ms of a ~30 ms recipe step (RESULTS.md)."""

    def __init__(self, checker):
        self._checker = checker

    def check(self, param_groups=None) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._checker, name)


def skip_redundant_engine_work(engine, zero_stage: int, world: int) -> None:
    """Drop what a DeepSpeed engine would do for nothing, without changing a single number:
    - ZeRO-0 on one rank: the gradient all-reduce after backward (flatten, reduce over one rank,
      copy back), ~0.9 ms of the recipe's step;
    - bf16 at ZeRO-0: the overflow scan that the gradient norm repeats (_GradNormCatchesOverflow).
    ZeRO-1/2/3 reduce inside their optimizers, which keep every step of theirs."""
    if zero_stage != 0:
        return
    if world == 1:
        engine.enable_backward_allreduce = False
    try:
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    except ImportError:  # a DeepSpeed that moved it keeps its own scan
        return
    optimizer = engine.optimizer
    if (engine.bfloat16_enabled() and isinstance(optimizer, FP16_UnfusedOptimizer)
            and not getattr(optimizer.loss_scale_config, "use_grad_scaling", True)):
        optimizer.overflow_checker = _GradNormCatchesOverflow(optimizer.overflow_checker)


def default_device(cfg: TrainConfig) -> torch.device:
    if cfg.cluster.use_gpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _all_reduce_sum(values: list[float] | torch.Tensor, device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                        device=device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def resolve_precision(cfg: TrainConfig, device: torch.device, resume_from: str | None) -> str:
    """trainer.precision, with `auto` decided: bf16 where every rank's device multiplies bf16 natively
    (emulated bf16 trains slower than fp32), else fp32. A resumed run keeps its checkpoint's choice, so
    its optimizer state loads as it was saved. Every rank calls this (a collective)."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    if resume_from:
        return load_config(resume_from).trainer.precision
    ranks_with_bf16 = _all_reduce_sum([float(native_bf16(device))], device).item()
    return "bf16" if ranks_with_bf16 == dist.get_world_size() else "fp32"


def _reduced_grad_norm(module: torch.nn.Module) -> float:
    """2-norm of gradients that DeepSpeed has already averaged across ranks."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(engine, data: PreparedData, cfg: TrainConfig, rank: int, world: int, device) -> dict:
    """Loss, perplexity and next-token accuracy on the same val windows at every evaluation. A data
    mixture's val windows are drawn by its weights from each source's own val split, and each source's
    loss is reported too (`val_loss/<source>`)."""
    mixture = data.mixture("val", cfg.data.weights)
    loader = TokenShardLoader(data.tokens("val"), sequence_length(cfg), cfg.trainer.micro_batch_size,
                              rank, world, seed=cfg.trainer.seed + 1, loss_mask=data.loss_mask("val"), mixture=mixture)
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss x targets, correct predictions, targets
    by_source = torch.zeros(len(mixture or []), 2, dtype=torch.float64)  # loss x targets, targets
    for _ in range(cfg.trainer.eval_steps):
        sources = loader.window_sources()
        x, y = (t.to(device) for t in loader.next_batch())
        logits, loss = engine(x, y)
        counted = y != -100  # chat data: the answer tokens only
        n = counted.sum().item()
        sums += torch.tensor([loss.item() * n, ((logits.argmax(-1) == y) & counted).sum().item(), n],
                             dtype=torch.float64)
        if mixture:
            row_losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").sum(1).double().cpu()
            rows = counted.sum(1).double().cpu()
            for row, source in enumerate(sources):
                by_source[source] += torch.stack([row_losses[row], rows[row]])
    engine.train()
    loss_sum, correct, count = _all_reduce_sum(sums, device).tolist()
    count = max(count, 1.0)
    val_loss = loss_sum / count
    metrics = {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 80.0)), "val_accuracy": correct / count}
    if mixture:
        for name, (source_loss, targets) in zip(data.source_names(), _all_reduce_sum(by_source, device).tolist()):
            metrics[f"val_loss/{name}"] = source_loss / max(targets, 1.0)
    return metrics


def pretrained_zero3_model(cfg: TrainConfig, rank: int) -> GPT:
    """ZeRO-3 fine-tuning: the model is built already partitioned (`deepspeed.zero.Init`), and each
    parameter is gathered in turn for rank 0 to copy its pretrained value in, then re-partitioned:
    no rank ever holds the whole model, and only rank 0 reads the weights file."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg)):
        model = GPT(cfg.model)
    state = None
    if rank == 0:
        from lm.pretrained import load_pretrained_state_dict

        state = load_pretrained_state_dict(cfg.trainer.init_from, cfg.model)
    for name, param in model.named_parameters():  # shared (tied) parameters come once
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                if name not in state:
                    raise ValueError(f"trainer.init_from={cfg.trainer.init_from!r}: no weights for {name}")
                param.data.copy_(state[name])
    return model


def train(cfg: TrainConfig, dataset_dir: str, hooks: TrainHooks, device: torch.device | None = None) -> dict:
    """Run (or continue) training to trainer.stop_at_step or trainer.max_steps; return final metrics."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed APIs that torch 2.13 deprecates, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.cluster.num_workers:
        raise ValueError(f"cluster.num_workers={cfg.cluster.num_workers} but the process group has {world} ranks")
    device = device or default_device(cfg)
    cfg = replace(cfg, trainer=replace(cfg.trainer, precision=resolve_precision(cfg, device, hooks.resume_from)))
    if rank == 0:
        hooks.started(config_to_dict(cfg))
    if device.type == "cpu":
        torch.set_num_threads(cfg.cluster.cpus_per_worker)
        keep_freed_memory()  # each step reuses its activations' pages instead of faulting them in
        if cfg.trainer.precision == "bf16" and not cpu_has_bf16() and rank == 0:
            warnings.warn("trainer.precision=bf16 on a CPU without bf16 instructions (AVX-512 BF16 or AMX): "
                          "torch emulates bf16 there, and it trains slower than fp32 (0.38x fp32 measured on such a CPU)")
    t, seq = cfg.trainer, sequence_length(cfg)
    data = PreparedData.load(dataset_dir)

    seed_everything(t.seed)  # identical initial weights on every rank
    if t.init_from and not hooks.resume_from and cfg.deepspeed.zero_stage == 3:
        model = pretrained_zero3_model(cfg, rank)
    else:
        model = GPT(cfg.model)
        if t.init_from and not hooks.resume_from:
            load_pretrained(model, t.init_from)
    fpt = flops_per_token(cfg.model, seq, model.num_params(numel=_numel))
    ds_config = deepspeed_config(cfg)
    # A run resumed on another number of ranks: its partitioned optimizer state is resharded through
    # DeepSpeed's universal checkpoint format.
    reshard = bool(hooks.resume_from) and needs_resharding(hooks.resume_from, world)
    if reshard:
        ds_config["checkpoint"] = {"load_universal": True}
    import_muon_without_compiling()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=ds_config)
    skip_redundant_engine_work(engine, cfg.deepspeed.zero_stage, world)
    if t.compile:
        # In place (nn.Module.compile): the module keeps its parameter names, so checkpoints and exports
        # read the same with or without it. Each new shape or mode (eval) compiles once, on first use.
        engine.compile()
    clip_here = trainer_clips_gradients(cfg)
    seed_everything(t.seed + 1000 * (rank + 1))  # distinct dropout streams per rank
    loader = TokenShardLoader(data.tokens("train"), seq, t.micro_batch_size, rank, world, t.seed,
                              loss_mask=data.loss_mask("train"), mixture=data.mixture("train", cfg.data.weights))

    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "metrics": {}}
    if hooks.resume_from:
        state = load_rank_checkpoint(engine, hooks.resume_from, rank, universal=reshard)
        loader.load_state_dict(state["loader"])

    peak: PeakFlops = peak_flops(device, t.precision)
    step_tokens = tokens_per_step(cfg)
    stop = t.stop_at_step or t.max_steps
    metrics = dict(state["metrics"])
    loss_sum = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    profiler = StepProfiler(t.profile_at, t.profile_steps, hooks.run_dir, rank, device, hooks.profiled)

    while state["step"] < stop:
        step = state["step"]
        lr = learning_rate(step, cfg.optim, t.max_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        step, last = step + 1, step + 1 == stop
        log_now = step % t.log_every == 0 or last
        profiler.step_begins(step)
        grad_norm = None
        for micro in range(t.grad_accum):
            x, y = (b.to(device) for b in loader.next_batch())
            _, loss = engine(x, y)
            engine.backward(loss)  # ZeRO-0: gradients are averaged across ranks when this returns
            if micro == t.grad_accum - 1:
                if clip_here and (cfg.optim.grad_clip > 0 or log_now):
                    grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(),
                                                               cfg.optim.grad_clip or math.inf, foreach=True)
                elif log_now and cfg.deepspeed.zero_stage == 0:
                    grad_norm = _reduced_grad_norm(engine.module)  # ZeRO-0 does not keep its clip norm
            engine.step()
            loss_sum += loss.detach().float()
        state["step"] = step
        state["tokens"] += step_tokens
        window_steps += 1

        preempted = False
        if log_now:  # the only host syncs in the loop
            elapsed = time.perf_counter() - window_start
            state["train_seconds"] += elapsed
            reduced = _all_reduce_sum([loss_sum.item(), float(hooks.stop_requested())], device).tolist()
            train_loss = reduced[0] / (world * t.grad_accum * window_steps)
            preempted = reduced[1] > 0 and not last
            tokens_per_second = step_tokens * window_steps / elapsed
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            train_metrics = dict(
                train_loss=train_loss, lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
                tokens_per_second=tokens_per_second, mfu=mfu(fpt, tokens_per_second, peak, world),
                memory_mb=_memory_mb(device), steps=step, tokens=state["tokens"])
            if t.precision == "fp16":  # dynamic loss scaling: its scale, and the steps it skipped on an overflow
                train_metrics.update(loss_scale=float(engine.optimizer.loss_scale), skipped_steps=engine.skipped_steps)
            metrics.update(train_metrics, peak_flops_source=peak.source, precision=t.precision)
            if rank == 0:
                hooks.log(train_metrics, step)
            loss_sum.zero_()
            window_steps, window_start = 0, time.perf_counter()
        paused = time.perf_counter()
        if step % t.eval_every == 0 or last:
            metrics.update(evaluate(engine, data, cfg, rank, world, device))
            if rank == 0:
                hooks.log({k: v for k, v in metrics.items() if k.startswith("val_")}, step)
        if step % t.ckpt_every == 0 or last or preempted:
            state["metrics"] = metrics
            state["loader"] = loader.state_dict()
            if rank == 0:  # kept from the checkpoint it resumed from unless the hooks say otherwise
                state["hooks"] = {**state.get("hooks", {}), **hooks.resume_state()}
            path = hooks.checkpoint_dir(step)
            save_rank_checkpoint(engine, path, rank, state, config_to_dict(cfg), data.tokenizer_path)
            dist.barrier()  # every rank's part is on disk before anyone lists it
            write_part_manifest(path, rank)
            dist.barrier()  # and listed before anyone calls it a checkpoint
            hooks.commit_checkpoint(step, path, dict(metrics))
        window_start += time.perf_counter() - paused  # eval and checkpoints are not training time
        profiler.step_ends(step)
        if preempted:
            metrics["stopped_early"] = True
            break

    profiler.close()
    dist.barrier()
    return metrics
