"""One-GPU benchmark without Ray (run by benchmarks/gpu.sh): DeepSpeed ZeRO-1 training of the
GPT-2 124M-class model in bf16 through our trainer (tokens/s, MFU against the GPU's dense bf16
peak), eager and with `trainer.compile`, then the serving engine's decode tokens/s on the same
shape, eager and compiled.

    python benchmarks/gpu_bench.py [--steps 40] [--micro-batch 16] [--device cuda]

The data are random token ids (speed does not depend on them), written as a token cache in a
temporary directory, so nothing is downloaded and no tokenizer is trained. `--device cpu` with
`--tiny` runs the same code on a CPU as a smoke check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lm.config import (ClusterConfig, DataConfig, DeepSpeedConfig, LoggingConfig, ModelConfig, RunConfig,  # noqa: E402
                       TrainConfig, TrainerConfig)

GPT2_124M = dict(name="gpt2-124m", variant="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
TINY = dict(name="tiny", variant="gpt2", n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=512)


def synthetic_dataset(directory: Path, vocab_size: int, tokens: int) -> Path:
    """A token cache (lm.data layout) of random ids."""
    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    rng.integers(0, vocab_size, tokens, dtype=dtype).tofile(directory / "train.bin")
    rng.integers(0, vocab_size, tokens // 10, dtype=dtype).tofile(directory / "val.bin")
    (directory / "tokenizer.json").write_text(json.dumps({"type": "char", "chars": [chr(0x100 + i) for i in range(vocab_size)]}))
    (directory / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
                                                     "tokenizer": "char", "train_tokens": tokens,
                                                     "val_tokens": tokens // 10, "documents": 1, "key": "synthetic"}))
    return directory


def train_benchmark(shape: dict, args, workdir: Path, compile: bool = False) -> dict:
    from lm.standalone import local_hooks
    from lm.trainer import train

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29512"))
    seq = shape["block_size"]
    dataset = synthetic_dataset(workdir, shape["vocab_size"], tokens=args.micro_batch * (seq + 1) * (args.steps + 8))
    cfg = TrainConfig(
        model=ModelConfig(**shape),
        data=DataConfig(name="synthetic", source="files", path=str(dataset), cache_dir=str(workdir)),
        deepspeed=DeepSpeedConfig(name="zero1", zero_stage=1),
        cluster=ClusterConfig(num_workers=1, use_gpu=args.device == "cuda", cpus_per_worker=os.cpu_count() or 1),
        logging=LoggingConfig(name="none", backend="none"),
        trainer=TrainerConfig(max_steps=args.steps, micro_batch_size=args.micro_batch, grad_accum=1,
                              eval_every=10**6, eval_steps=1, ckpt_every=10**6, log_every=5,
                              precision=args.precision, sample_tokens=0, compile=compile),
        run=RunConfig(name="gpu-bench", storage=str(workdir / "runs")),
    )
    cfg.optim.warmup_steps = 5
    logged: list[dict] = []
    hooks = local_hooks(workdir / "runs" / "gpu-bench", 0, keep=1, log=lambda m, s: "mfu" in m and logged.append(m))
    hooks.checkpoint_dir = lambda step: str(workdir / "skip")  # the final checkpoint is not what we measure
    hooks.commit_checkpoint = lambda *a: None
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    metrics = train(cfg, str(dataset), hooks, device=device)
    windows = logged[1:] or logged  # the first window holds start-up steps
    return {"tokens_per_second": statistics.median(m["tokens_per_second"] for m in windows),
            "mfu": statistics.median(m["mfu"] for m in windows), "memory_mb": metrics.get("memory_mb"),
            "peak_flops_source": metrics.get("peak_flops_source"), "train_loss": metrics.get("train_loss"),
            "tokens_per_step": args.micro_batch * seq}


def decode_benchmark(shape: dict, args, batches: list[int], compile: bool = False) -> dict:
    """Decode tokens/s per batch size; `compile`: the engine's compiled decode step (serve.compile)."""
    from lm.engine import Engine
    from lm.model import GPT

    class TokenIds:  # ids are the text: the benchmark measures the model and the decode loop
        vocab_size, eot_id = shape["vocab_size"], None

        def decode(self, ids):
            return ""

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = GPT(ModelConfig(**shape)).to(device=args.device, dtype=dtype).eval()
    return {batch: decode_tokens_per_second(Engine(model, TokenIds(), max_batch_size=batch, compile=compile), batch, args)
            for batch in batches}


def decode_tokens_per_second(engine, batch: int, args) -> float:
    from lm.engine import SamplingParams

    prompts = [list(range(i, i + 16)) for i in range(batch)]
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))  # warm-up
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=args.new_tokens, temperature=0))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return batch * args.new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke check of the script")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-train-compile", dest="train_compile", action="store_false",
                        help="skip the second training run with trainer.compile (torch.compile of the model)")
    parser.add_argument("--compile-batches", type=int, nargs="*", default=[1, 8],
                        help="batch sizes to decode again with the compiled decode step (none: skip)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu.json")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    shape = TINY if args.tiny else GPT2_124M
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    where = "1 GPU" if args.device == "cuda" else "1 CPU process"
    results = {"device": device_name, "shape": shape, "precision": args.precision, "steps": args.steps,
               "micro_batch": args.micro_batch, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    rows: list[str] = []

    def record(key: str, value, lines: list[str]) -> None:
        """Keep a phase's result: its rows print now and the JSON is rewritten, so a run stopped by a
        time limit still leaves every phase it finished."""
        results[key] = value
        rows.extend(lines)
        for line in lines:
            print(f"result: {line}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    def train_rows(result: dict, label: str) -> list[str]:
        if "error" in result:
            return [f"{label}: failed: {result['error']}"]
        return [f"{label:<44} {result['tokens_per_second']:>10.0f} tokens/s  MFU {result['mfu']:.1%}  "
                f"({result['peak_flops_source']})"]

    def decode_rows(result: dict, label: str) -> list[str]:
        if "error" in result:
            return [f"{label}: failed: {result['error']}"]
        return [f"{f'{label}, batch {batch}, {args.new_tokens} new tokens':<44} {value:>10.0f} tokens/s"
                for batch, value in result.items()]

    # Most important first: eager training (the MFU target), eager decode, then the compiled variants,
    # which are untested on CUDA before this script's first GPU run: a failure there is recorded, not raised.
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        train_result = train_benchmark(shape, args, Path(tmp))
    record("train", train_result, train_rows(train_result, f"train: DeepSpeed ZeRO-1, {where}, no Ray"))
    decode = decode_benchmark(shape, args, args.decode_batches)
    record("decode_tokens_per_second", decode, decode_rows(decode, "decode: engine"))
    if args.train_compile:
        try:
            with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
                train_compiled = train_benchmark(shape, args, Path(tmp), compile=True)
        except Exception as error:  # noqa: BLE001
            train_compiled = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        record("train_compiled", train_compiled, train_rows(train_compiled, "train: the same with trainer.compile"))
    if args.compile_batches:
        try:
            compiled = decode_benchmark(shape, args, args.compile_batches, compile=True)
        except Exception as error:  # noqa: BLE001
            compiled = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        record("decode_compiled_tokens_per_second", compiled, decode_rows(compiled, "decode: engine compiled"))

    print(f"\n{shape['name']} ({shape['n_layer']}L/{shape['n_embd']}/{shape['n_head']}H, T={shape['block_size']}, "
          f"vocab {shape['vocab_size']}) on {device_name}, {args.precision}")
    print("\n".join(rows))
    print(f"JSON: {args.out}")

if __name__ == "__main__":
    main()
