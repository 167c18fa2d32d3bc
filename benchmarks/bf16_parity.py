"""bf16 against fp32 training: the same model, data and seeds, so any difference in the loss curve
is the precision's. Two seeds per precision give the noise to hold that difference against.

    .venv/bin/python benchmarks/bf16_parity.py [--steps 300] [--seeds 1337 2024]

Each run is our trainer (lm.standalone under torchrun, 1 worker, ZeRO-0, 2 threads) on the
training benchmark's model shape (6 layers, 384 wide, T=256, batch 8) and corpus; bf16 is
`trainer.precision=bf16` (DeepSpeed's bf16 mode). Printed: train loss per logged window and val
loss per evaluation for every run; the largest |bf16 - fp32| gap between runs of the same seed,
against the largest gap between the two fp32 seeds; and tokens/s.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from train_throughput import REPO, corpus, torchrun_output, train_config  # benchmarks/ (run as a script)

from report import scratch_dir, write_report


def run(cfg, dataset_dir: Path, workdir: Path) -> dict:
    """Train one run; its logged train losses, val losses and tokens/s, by step."""
    output = torchrun_output(cfg, dataset_dir, workdir)
    train, val, speed = {}, {}, []
    for step, fields in re.findall(r"\[step (\d+)\] (.*)", output):
        values = dict(re.findall(r"(\w+)=([0-9.e+-]+)", fields))
        if "train_loss" in values:
            train[int(step)] = float(values["train_loss"])
            speed.append(float(values["tokens_per_second"]))
        if "val_loss" in values:
            val[int(step)] = float(values["val_loss"])
    return {"train_loss": train, "val_loss": val, "tokens_per_second": statistics.median(speed[1:] or speed)}


def largest_gap(a: dict[int, float], b: dict[int, float], from_step: int = 0) -> float:
    return max(abs(a[step] - b[step]) for step in a if step in b and step >= from_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs=2, default=[1337, 2024])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bf16_parity.json")
    args = parser.parse_args()
    from lm.data import prepare_data

    workdir = scratch_dir("bf16_parity_")
    corpus_file = corpus(workdir)
    dataset_dir = prepare_data(train_config(workdir, corpus_file, 1, 0, args.steps).data, progress=False).directory
    runs: dict[str, dict] = {}
    for seed in args.seeds:  # fp32 and bf16 of a seed back to back, so drift hits both alike
        for precision in ("fp32", "bf16"):
            cfg = train_config(workdir, corpus_file, 1, 0, args.steps, precision)
            cfg.trainer.seed = seed
            cfg.trainer.log_every = max(1, args.steps // 12)
            cfg.trainer.eval_every, cfg.trainer.eval_steps = max(1, args.steps // 3), 8
            runs[f"{precision} seed {seed}"] = run(cfg, dataset_dir, workdir)
            print(f"{precision} seed {seed}: done", flush=True)

    names = list(runs)
    steps = sorted(runs[names[0]]["train_loss"])
    print(f"\ntrain loss (window means), {args.steps} steps")
    print(f"{'step':>6} " + " ".join(f"{n:>16}" for n in names))
    for step in steps:
        print(f"{step:>6} " + " ".join(f"{runs[n]['train_loss'].get(step, float('nan')):>16.4f}" for n in names))
    print("\nval loss")
    for step in sorted(runs[names[0]]["val_loss"]):
        print(f"{step:>6} " + " ".join(f"{runs[n]['val_loss'].get(step, float('nan')):>16.4f}" for n in names))
    a, b = args.seeds

    def same_seed(curve: str, from_step: int = 0) -> float:
        return max(largest_gap(runs[f"bf16 seed {s}"][curve], runs[f"fp32 seed {s}"][curve], from_step) for s in args.seeds)

    def seed_to_seed(curve: str, from_step: int = 0) -> float:
        return largest_gap(runs[f"fp32 seed {a}"][curve], runs[f"fp32 seed {b}"][curve], from_step)

    # The steep first descent magnifies any lag into a large loss difference; the second line of each
    # pair leaves out the first quarter of the steps.
    quarter = args.steps // 4
    gaps = {
        "bf16 vs fp32, same seed (train)": same_seed("train_loss"),
        f"bf16 vs fp32, same seed (train, from step {quarter})": same_seed("train_loss", quarter),
        "fp32 seed vs seed (train)": seed_to_seed("train_loss"),
        f"fp32 seed vs seed (train, from step {quarter})": seed_to_seed("train_loss", quarter),
        "bf16 vs fp32, same seed (val)": same_seed("val_loss"),
        "fp32 seed vs seed (val)": seed_to_seed("val_loss"),
    }
    speed = {p: statistics.median(runs[f"{p} seed {s}"]["tokens_per_second"] for s in args.seeds) for p in ("fp32", "bf16")}
    print()
    for name, gap in gaps.items():
        print(f"{'largest gap, ' + name:<62} {gap:>8.4f}")
    print(f"{'tokens/s fp32, bf16 (median of seeds)':<62} {speed['fp32']:>8.0f} {speed['bf16']:>8.0f}  "
          f"({speed['bf16'] / speed['fp32']:.2f}x)")
    write_report(args.out, {"steps": args.steps, "seeds": args.seeds, "runs": runs, "gaps": gaps, "tokens_per_second": speed})


if __name__ == "__main__":
    main()
