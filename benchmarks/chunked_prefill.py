"""Chunked prefill (`serve.max_num_batched_tokens`): the running streams' inter-token latency while long
prompts arrive, and those prompts' time to first token, with whole prefills against chunked ones, in
one run.

    .venv/bin/python benchmarks/chunked_prefill.py [--threads 2] [--streams 8] [--long-prompt 768] [--repeats 3]

Shape: the decode benchmark's GPT-2 (6 layers, 384 wide, vocab 8192) with a 1,024-token context, random
weights. `--streams` sequences decode throughout (16-token prompts); every 30 steps a request with a
`--long-prompt`-token prompt arrives. Inter-token latency is the time of each step in which the
streams advanced; each cell is the median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from lm.engine import Engine, SamplingParams

from decode_throughput import TokenIds
from prefix_cache import SHAPE, long_context_model, random_ids
from report import write_report  # benchmarks/ (run as a script)

ARRIVALS = (10, 40, 70, 100)  # steps at which a long prompt arrives
STEPS = 130


def run(engine: Engine, streams: int, long_prompt: int, seed: int) -> dict:
    running = [engine.submit(random_ids(16, seed * 1000 + i), SamplingParams(max_tokens=STEPS + 10, temperature=0))
               for i in range(streams)]
    step_ms, first_token_ms, arrived = [], [], {}
    for step in range(STEPS):
        if step in ARRIVALS:
            seq = engine.submit(random_ids(long_prompt, seed * 1000 + 100 + step),
                                SamplingParams(max_tokens=4, temperature=0))
            arrived[seq.id] = (seq, time.perf_counter())
        before = [len(s.output_ids) for s in running]
        start = time.perf_counter()
        engine.step()
        now = time.perf_counter()
        if step > 0 and all(len(s.output_ids) == b + 1 for s, b in zip(running, before)):
            step_ms.append((now - start) * 1000)
        for seq_id in [i for i, (s, _) in arrived.items() if s.output_ids]:
            first_token_ms.append((now - arrived.pop(seq_id)[1]) * 1000)
    engine.cancel_all()
    step_ms.sort()
    p99 = step_ms[min(len(step_ms) - 1, int(0.99 * len(step_ms)))]
    return {"itl_p50_ms": statistics.median(step_ms), "itl_p99_ms": p99, "itl_max_ms": step_ms[-1],
            "long_ttft_ms": statistics.median(first_token_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-prompt", type=int, default=768)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 256, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chunked_prefill.json"))
    args = parser.parse_args()
    model = long_context_model(args.threads)
    settings = {"whole prefills": None, **{f"max_num_batched_tokens={b}": b for b in args.budgets}}
    samples = {name: [] for name in settings}
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        for name, budget in settings.items():  # alternate: drift hits every row alike
            engine = Engine(model, TokenIds(), max_batch_size=args.streams + 4, max_num_batched_tokens=budget)
            result = run(engine, args.streams, args.long_prompt, repeat)
            if repeat:
                samples[name].append(result)
    results = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for name, rows in samples.items()}

    print(f"\n{args.streams} streams decoding, a {args.long_prompt}-token prompt every 30 steps "
          f"(ms, median of {args.repeats})")
    print(f"{'prefill':<30} {'ITL p50':>8} {'ITL p99':>8} {'ITL max':>8} {'long TTFT':>10}")
    for name, row in results.items():
        print(f"{name:<30} {row['itl_p50_ms']:>8.1f} {row['itl_p99_ms']:>8.1f} {row['itl_max_ms']:>8.1f} "
              f"{row['long_ttft_ms']:>10.1f}")
    write_report(args.out, {"results": results, "threads": args.threads, "streams": args.streams,
                            "long_prompt": args.long_prompt, "arrivals": ARRIVALS, "steps": STEPS,
                            "repeats": args.repeats, "shape": SHAPE})


if __name__ == "__main__":
    main()
