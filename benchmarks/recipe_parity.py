"""nanoGPT's CPU recipe through our `make`-level command, against nanoGPT's own loop in the same run:

    make train ARGS="experiment=shakespeare_char data.path=<input.txt>"
    python benchmarks/nanogpt_recipe.py --data <input.txt> ...   (nanoGPT's prepare.py + train.py on a CPU)

nanoGPT reports val loss 1.88 after 2000 iterations (about 3 minutes on a CPU) for this recipe on
tiny Shakespeare (its `data/shakespeare_char/input.txt`). Both commands are timed from start to
finish (ours: install check, token cache, Ray and DeepSpeed start-up included), alternated when
repeated. Each one's own val loss estimate samples different windows, so both final models are also
scored on the same val characters (`nanogpt_recipe.windowed_loss`).

    .venv/bin/python benchmarks/recipe_parity.py --data input.txt [--max-steps 2000] [--repeats 1]
        [--target 1.88] [more Hydra overrides for our run, e.g. trainer.precision=fp32]

Nothing is downloaded: pass the text file. Without --data it uses a stand-in (~1.1 MB of the
standard library's prose-heavy modules) so the command still runs; its losses are not Shakespeare's,
and the table says so.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from nanogpt_recipe import val_split, windowed_loss  # benchmarks/ (run as a script)
from report import scratch_dir, write_report

REPO = Path(__file__).resolve().parent.parent


def stand_in_text(directory: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text.append(path.read_text(errors="replace"))
        size += len(text[-1])
        if size > 1_100_000:
            break
    out = directory / "stand_in.txt"
    out.write_text("".join(text)[:1_115_394])  # tiny Shakespeare's length in characters
    return out


def timed(command: list[str], val_pattern: str, target: float) -> dict:
    """Run `command`; its wall time and every val loss it printed, with when it printed it."""
    start = time.perf_counter()
    evals, lines = [], []
    with subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            lines.append(line)
            match = re.search(val_pattern, line)
            if match:
                evals.append({"step": int(match.group(1)), "val_loss": float(match.group(2)),
                              "seconds": time.perf_counter() - start})
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stdout.write("".join(lines[-30:]))
        raise SystemExit(f"{' '.join(command[:3])} failed with status {proc.returncode}")
    reached = next((e for e in evals if e["val_loss"] <= target), None)
    return {"wall_seconds": wall, "evals": evals, "reached": reached, "output": lines}


def run_nanogpt(data: Path, workdir: Path, max_steps: int, target: float) -> dict:
    # -u: its per-iteration lines reach us as a terminal would show them, each one as it is printed.
    result = timed([sys.executable, "-u", str(REPO / "benchmarks/nanogpt_recipe.py"), "--data", str(data),
                    "--workdir", str(workdir), "--max-iters", str(max_steps)],
                   r"^step (\d+): train loss [0-9.]+, val loss ([0-9.]+)", target)
    final = json.loads(result.pop("output")[-1])
    return {**result, "final_val_loss": final["val_loss"], "whole_val_loss": final["full_val_loss"]}


def run_ours(data: Path, workdir: Path, max_steps: int, target: float, overrides: list[str]) -> dict:
    import torch

    from lm.checkpoint import load_model

    runs = workdir / "runs"
    args = ["experiment=shakespeare_char", f"data.path={data}", f"trainer.max_steps={max_steps}", "logging=none",
            f"run.storage={runs}", f"data.cache_dir={workdir}/cache", "run.name=parity", *overrides]
    result = timed(["make", "-s", "train", f"ARGS={' '.join(args)}"], r"\[step (\d+)\] val_loss=([0-9.]+)", target)
    result.pop("output")
    summary = json.loads((runs / "parity" / "summary.json").read_text())
    model, tokenizer, _ = load_model(summary["checkpoint"])
    val_ids = torch.tensor(tokenizer.encode(val_split(data.read_text())))
    return {**result, "final_val_loss": summary["val_loss"], "tokens_per_second": summary["tokens_per_second"],
            "precision": summary.get("precision"), "whole_val_loss": windowed_loss(lambda x, y: model(x, y)[1], val_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="the text file (nanoGPT's tiny Shakespeare input.txt)")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternated")
    parser.add_argument("--target", type=float, default=1.88)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/recipe_parity.json")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for our run, e.g. trainer.precision=fp32")
    args = parser.parse_args()
    workdir = scratch_dir("recipe_parity_")
    data = args.data.resolve() if args.data else stand_in_text(workdir)
    runs = {"nanogpt": [], "ours": []}
    for repeat in range(args.repeats):
        order = ("ours", "nanogpt") if repeat % 2 == 0 else ("nanogpt", "ours")
        for name in order:
            run_dir = workdir / f"{name}_{repeat}"
            run_dir.mkdir()
            runs[name].append(run_ours(data, run_dir, args.max_steps, args.target, args.overrides) if name == "ours"
                              else run_nanogpt(data, run_dir, args.max_steps, args.target))
            print(f"{name}: {runs[name][-1]['wall_seconds']:.1f} s, whole-val loss {runs[name][-1]['whole_val_loss']:.4f}",
                  flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    def reached(name: str) -> str:
        times = [r["reached"]["seconds"] for r in runs[name] if r["reached"]]
        return f"{statistics.median(times):.1f} s" if len(times) == len(runs[name]) else "never"

    source = str(args.data) if args.data else "stand-in text (NOT Shakespeare: compare the two columns only)"
    precision = runs["ours"][0]["precision"]
    print(f"\nexperiment=shakespeare_char, {args.max_steps} steps, {args.repeats} run(s) each (medians), data: {source}")
    print(f"{'':<42} {'nanoGPT loop':>14} {'ours (make train)':>18}")
    rows = [("wall time, command start to finish (s)", "wall_seconds", ".1f"),
            ("final val loss, own estimate", "final_val_loss", ".3f"),
            ("final val loss, whole val split", "whole_val_loss", ".3f")]
    for label, key, fmt in rows:
        print(f"{label:<42} {median('nanogpt', key):>14{fmt}} {median('ours', key):>18{fmt}}")
    print(f"{'val loss <= ' + str(args.target) + ' first at':<42} {reached('nanogpt'):>14} {reached('ours'):>18}")
    speed = f"{precision}, {median('ours', 'tokens_per_second'):.0f}"
    print(f"{'ours: precision, training tokens/s':<42} {'fp32':>14} {speed:>18}")
    ratio = median("ours", "wall_seconds") / median("nanogpt", "wall_seconds")
    print(f"{'wall time, ours / nanoGPT':<42} {ratio:>33.2f}x")
    write_report(args.out, {"data": source, "max_steps": args.max_steps, "repeats": args.repeats,
                            "target": args.target, "overrides": args.overrides, "wall_ratio": ratio, "runs": runs})


if __name__ == "__main__":
    main()
