"""Training tokens/s and MFU for one model and batch, side by side in one run:

  (a) a plain single-process PyTorch loop (AdamW, same model, same threads): the overhead floor
  (b) our trainer, 1 worker, ZeRO-0, without Ray (torchrun + lm.standalone)
  (c) the same through Ray (python -m launcher.train)
  (d) ZeRO-0, 1, 2 and 3 with 2 workers (1 thread each; torchrun)
  (e) our model's forward+backward against Hugging Face GPT2LMHeadModel of the same dimensions
  plus bf16: autocast in the plain loop, and the trainer with `trainer.precision=bf16` (DeepSpeed's
  bf16 mode: bf16 weights, fp32 master weights in its optimizer wrapper), and the matmul peak in the
  run's dtype measured in the same run: just before and just after every run, so each run's MFU is
  against the VM's speed at that time (a 2-vCPU VM's peak moves by 25%+ over minutes) and the MFU
  column is the median of those. bf16 rows are against the bf16 peak (fp32's where the CPU has no
  bf16 instructions, as torch then emulates them).

    .venv/bin/python benchmarks/train_throughput.py [--steps 32] [--repeats 1] [--only a,b,e]

Shape from the speed issue: 6 layers, 384 wide, 6 heads, T=256, batch 8, vocab 8192, fp32, 2 threads
(model=small). Tokens/s of the trainers are the medians of their logged windows (4 steps each)
after the first two, which overlap start-up (Ray's own processes settle for ~20 s after a job
starts); evaluation and checkpoints are outside those windows. The plain loop and the
forward+backward timings skip their first steps. Ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lm.config import (ClusterConfig, DataConfig, DeepSpeedConfig, LoggingConfig, ModelConfig, RunConfig,  # noqa: E402
                       TrainConfig, TrainerConfig, config_to_dict)
from lm.mfu import measure_matmul_flops, peak_matmul_dtype  # noqa: E402
from lm.model import GPT, flops_per_token  # noqa: E402
from report import scratch_dir, write_report  # noqa: E402  (benchmarks/, run as a script)

SHAPE = dict(name="small", variant="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)
BATCH, SEQ, THREADS = 8, 256, 2
WARMUP = 2


def plain_loop(steps: int, bf16: bool = False) -> float:
    """(a): tokens/s of the textbook loop: forward, backward, clip, AdamW step."""
    from lm.trainer import build_optimizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPE)).train()
    cfg = TrainConfig()
    optimizer = build_optimizer(model, cfg.optim)
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
    y = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return BATCH * SEQ / statistics.median(times[WARMUP:])


def forward_backward(model, steps: int, hf: bool) -> float:
    """(e): tokens/s of forward + backward alone (no optimizer), same batch for both models."""
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(x, labels=x).loss if hf else model(x, x)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return BATCH * SEQ / statistics.median(times[WARMUP:])


def hf_gpt2():
    import transformers

    from lm.hf_format import hf_config

    config = {k: v for k, v in hf_config(ModelConfig(**SHAPE)).items()
              if k not in ("architectures", "model_type", "torch_dtype")}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).train()


def corpus(workdir: Path) -> Path:
    """~2 MB of the standard library's source as one text file (content does not change speed)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:120])
    path = workdir / "corpus.txt"
    path.write_text(text)
    return path


def train_config(workdir: Path, corpus_file: Path, workers: int, stage: int, steps: int,
                 precision: str = "fp32") -> TrainConfig:
    model = {k: v for k, v in SHAPE.items() if k != "vocab_size"}
    return TrainConfig(
        model=ModelConfig(**model, vocab_size=SHAPE["vocab_size"]),
        data=DataConfig(name="text", source="files", path=str(corpus_file), vocab_size=SHAPE["vocab_size"],
                        val_fraction=0.05, cache_dir=str(workdir / "cache")),
        deepspeed=DeepSpeedConfig(name=f"zero{stage}", zero_stage=stage),
        cluster=ClusterConfig(num_workers=workers, cpus_per_worker=THREADS // workers),
        logging=LoggingConfig(name="none", backend="none"),
        trainer=TrainerConfig(max_steps=steps, micro_batch_size=BATCH // workers, grad_accum=1, eval_every=10**6,
                              eval_steps=1, ckpt_every=10**6, log_every=4, sample_tokens=0, precision=precision),
        run=RunConfig(name=f"w{workers}-zero{stage}-{precision}-{time.time_ns()}", storage=str(workdir / "runs")),
    )


def logged_tokens_per_second(output: str) -> float:
    values = [float(v) for v in re.findall(r"tokens_per_second=([0-9.e+]+)", output)]
    if len(values) < 3:
        raise RuntimeError(f"too few logged windows in the output (use --steps >= 12):\n{output[-3000:]}")
    return statistics.median(values[2:])  # the first windows overlap start-up


def torchrun_trainer(cfg: TrainConfig, dataset_dir: Path, workdir: Path) -> float:
    """(b) and (d): lm.standalone under torchrun, one process per worker."""
    return logged_tokens_per_second(torchrun_output(cfg, dataset_dir, workdir))


def torchrun_output(cfg: TrainConfig, dataset_dir: Path, workdir: Path) -> str:
    """Train with lm.standalone under torchrun (one process per worker); its printed output."""
    config_file = workdir / f"{cfg.run.name}.json"
    config_file.write_text(json.dumps(config_to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(cfg.cluster.cpus_per_worker)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={cfg.cluster.num_workers}", "-m", "lm.standalone",
                             "--config", str(config_file), "--dataset-dir", str(dataset_dir)],
                            capture_output=True, text=True, env=env, cwd=workdir, timeout=1800)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return result.stdout


def ray_trainer(corpus_file: Path, workdir: Path, steps: int) -> float:
    """(c): python -m launcher.train, 1 Ray worker with 2 CPUs, ZeRO-0."""
    overrides = ["model=small", "deepspeed=zero0", "cluster.num_workers=1", f"cluster.cpus_per_worker={THREADS}",
                 "data=text", f"data.path={corpus_file}", f"data.vocab_size={SHAPE['vocab_size']}", "data.val_fraction=0.05",
                 f"data.cache_dir={workdir / 'cache'}", f"trainer.micro_batch_size={BATCH}", f"trainer.max_steps={steps}",
                 "trainer.log_every=4", "trainer.eval_every=1000000", "trainer.eval_steps=1", "trainer.ckpt_every=1000000",
                 "trainer.sample_tokens=0", "logging=none", f"run.storage={workdir / 'runs'}", f"run.name=ray-{time.time_ns()}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-m", "launcher.train", *overrides], capture_output=True, text=True,
                            env=env, cwd=workdir, timeout=1800)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return logged_tokens_per_second(result.stdout + result.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="the bf16 rows; auto: only where the CPU has bf16 instructions (AVX-512 BF16 or AMX), "
                             "since torch emulates them elsewhere, 10-40x slower than fp32")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(THREADS)
    workdir = scratch_dir("train_bench_")
    corpus_file = corpus(workdir)
    dataset_dir = None
    if only & {"b", "d"}:
        from lm.data import prepare_data

        dataset_dir = prepare_data(train_config(workdir, corpus_file, 1, 0, args.steps).data, progress=False).directory

    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    if not bf16 and only & {"a", "b"}:
        print("bf16 rows skipped: " + ("--bf16 off" if args.bf16 == "off" else
                                       "this CPU has no bf16 instructions (--bf16 on runs them emulated)"))
    runners: dict[str, callable] = {}
    if "a" in only:
        runners["(a) plain PyTorch loop"] = lambda: plain_loop(args.steps)
        if bf16:
            runners["(a) plain loop, bf16 autocast"] = lambda: plain_loop(args.steps, bf16=True)
    if "b" in only:
        runners["(b) trainer, 1 worker, ZeRO-0"] = lambda: torchrun_trainer(
            train_config(workdir, corpus_file, 1, 0, args.steps), dataset_dir, workdir)
        if bf16:
            runners["(b) trainer, 1 worker, ZeRO-0, bf16"] = lambda: torchrun_trainer(
                train_config(workdir, corpus_file, 1, 0, args.steps, "bf16"), dataset_dir, workdir)
    if "c" in only:
        runners["(c) trainer via Ray, 1 worker, ZeRO-0"] = lambda: ray_trainer(corpus_file, workdir, args.steps)
    if "d" in only:
        for stage in (0, 1, 2, 3):
            runners[f"(d) 2 workers, ZeRO-{stage}"] = lambda stage=stage: torchrun_trainer(
                train_config(workdir, corpus_file, 2, stage, args.steps), dataset_dir, workdir)
    if "e" in only:
        ours = GPT(ModelConfig(**SHAPE)).train()
        theirs = hf_gpt2()
        runners["(e) fwd+bwd, our GPT"] = lambda: forward_backward(ours, args.steps, hf=False)
        runners["(e) fwd+bwd, HF GPT2LMHeadModel"] = lambda: forward_backward(theirs, args.steps, hf=True)

    fpt = flops_per_token(ModelConfig(**SHAPE), SEQ, GPT(ModelConfig(**SHAPE)).num_params())
    samples: dict[str, list[float]] = {name: [] for name in runners}
    mfus: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):  # alternate, so drift hits every row alike
        for name, run in runners.items():
            dtype = peak_matmul_dtype(torch.device("cpu"), "bf16" if "bf16" in name else "fp32")
            before = measure_matmul_flops(torch.device("cpu"), dtype)
            samples[name].append(run())
            peak = (before + measure_matmul_flops(torch.device("cpu"), dtype)) / 2
            peaks["bf16" if dtype == torch.bfloat16 else "fp32"].append(peak)
            mfus[name].append(fpt * samples[name][-1] / peak)
    results = {name: statistics.median(values) for name, values in samples.items()}
    mfu = {name: statistics.median(values) for name, values in mfus.items()}

    def ratio(a: str, b: str) -> str:
        return f"{results[a] / results[b]:.2f}x" if a in results and b in results else "-"

    print(f"\n{'run (6L/384/6H, T=256, batch 8, 2 threads)':<42} {'tokens/s':>9} {'MFU':>6}")
    for name, value in results.items():
        print(f"{name:<42} {value:>9.0f} {mfu[name]:>6.1%}")
    ratios = {
        "(b) / (a)": ratio("(b) trainer, 1 worker, ZeRO-0", "(a) plain PyTorch loop"),
        "(c) / (b)": ratio("(c) trainer via Ray, 1 worker, ZeRO-0", "(b) trainer, 1 worker, ZeRO-0"),
        "ZeRO-1 step time / ZeRO-0": ratio("(d) 2 workers, ZeRO-0", "(d) 2 workers, ZeRO-1"),
        "ZeRO-2 step time / ZeRO-0": ratio("(d) 2 workers, ZeRO-0", "(d) 2 workers, ZeRO-2"),
        "ZeRO-3 step time / ZeRO-0": ratio("(d) 2 workers, ZeRO-0", "(d) 2 workers, ZeRO-3"),
        "our fwd+bwd / HF's": ratio("(e) fwd+bwd, our GPT", "(e) fwd+bwd, HF GPT2LMHeadModel"),
        "bf16 autocast / fp32 (plain loop)": ratio("(a) plain loop, bf16 autocast", "(a) plain PyTorch loop"),
        "bf16 / fp32 (trainer)": ratio("(b) trainer, 1 worker, ZeRO-0, bf16", "(b) trainer, 1 worker, ZeRO-0"),
    }
    print()
    for dtype, values in peaks.items():
        if values:
            print(f"{dtype} matmul peak around each run ({THREADS} threads): median {statistics.median(values) / 1e9:.0f} "
                  f"GFLOP/s, {min(values) / 1e9:.0f}-{max(values) / 1e9:.0f}")
    print(f"MFU = {fpt / 1e6:.1f} MFLOP/token x tokens/s / that run's peak")
    for name, value in ratios.items():
        print(f"{name:<42} {value:>9}")
    write_report(args.out, {"tokens_per_second": results, "samples": samples, "ratios": ratios,
                            "mfu": mfu, "mfu_samples": mfus, "peak_flops_per_run": peaks, "flops_per_token": fpt, "steps": args.steps,
                            "repeats": args.repeats})


if __name__ == "__main__":
    main()
