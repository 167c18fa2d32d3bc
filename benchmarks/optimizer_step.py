"""AdamW step time on CPU: torch's default (one tensor at a time), foreach, and fused, for the
recipe's model (4 layers, 128 wide, 0.8M parameters) and the throughput benchmark's (6 x 384, 14M).

    .venv/bin/python benchmarks/optimizer_step.py [--threads 2]

Why: on CPU, torch's AdamW defaults to its single-tensor path (~10 elementwise ops per parameter
tensor); `fused=True` is one kernel per tensor. lm.trainer.build_optimizer uses the fused one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lm.config import ModelConfig
from lm.model import GPT
from lm.trainer import optimizer_param_groups

from report import write_report  # benchmarks/ (run as a script)

MODELS = {"recipe 4x128": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=128, bias=False),
          "bench 6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)}
VARIANTS = {"single-tensor (default)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(model: GPT, options: dict, steps: int = 30, repeats: int = 3) -> float:
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-3, **options)
    for _ in range(5):
        optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/optimizer_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model_name, shape in MODELS.items():
        torch.manual_seed(0)
        model = GPT(ModelConfig(**shape))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for variant, options in VARIANTS.items():
            rows.append({"model": model_name, "params": model.num_params(non_embedding=False), "variant": variant,
                         "ms_per_step": step_ms(model, options)})
    print(f"\nAdamW step on CPU, {args.threads} threads")
    print(f"{'model':<14}{'params':>12}  {'variant':<24}{'ms/step':>9}{'vs default':>11}")
    for r in rows:
        base = next(b["ms_per_step"] for b in rows if b["model"] == r["model"])
        print(f"{r['model']:<14}{r['params']:>12,}  {r['variant']:<24}{r['ms_per_step']:>9.2f}"
              f"{base / r['ms_per_step']:>10.2f}x")
    write_report(args.out, {"threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
