"""Prefix-aware routing across model replicas (`serve.request_router=prefix_affinity`) against Serve's
own router (`power_of_two`), in one run, through the real Ray Serve app on 127.0.0.1.

    .venv/bin/python benchmarks/prefix_routing.py [--replicas 2] [--conversations 8] [--turns 6] [--think-s 0.5] [--repeats 2]

The workload is the one prefix caching is for: concurrent multi-turn conversations that share a
system prompt, each turn resending the conversation so far plus a new message (token-id prompts,
so every turn's prompt extends the last exactly). Reported per router: the share of prompt tokens
found in the serving replica's prefix cache (the server's own `usage.prompt_tokens_details.
cached_tokens`), time to first token p50/p90, and the workload's wall time; medians of repeats,
the routers alternating, each on freshly started replicas (empty caches). Each turn follows a pause
(the user reading and typing), during which other conversations' requests come and go.

The model is the decode benchmark's shape (6 layers, 384 wide, vocab 8192) with a 1,024-token
context and random weights; each replica has one CPU (serving's default) and the default prefix
cache (4 x 1,024 tokens).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from decode_throughput import SHAPE  # benchmarks/ (run as a script)
from report import scratch_dir, write_report
from serve_throughput import streamed_completion, write_export

ROUTERS = ("power_of_two", "prefix_affinity")
LONG_SHAPE = {**SHAPE, "block_size": 1024}


def one_turn(client: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> tuple[float, int, int]:
    """(seconds to the first chunk, prompt tokens, of which cached) for one streaming request."""
    start, first, usage = time.perf_counter(), None, None
    for chunk in streamed_completion(client, url, prompt, max_tokens):
        if chunk.get("usage"):
            usage = chunk["usage"]
        elif first is None:
            first = time.perf_counter() - start
    return first, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def run_workload(client: httpx.Client, url: str, args, seed: int) -> dict:
    """`conversations` clients at once, each sending its `turns` turns back to back."""
    rng = random.Random(seed)
    system = [rng.randrange(256, SHAPE["vocab_size"]) for _ in range(args.system_tokens)]
    messages = [[[rng.randrange(256, SHAPE["vocab_size"]) for _ in range(args.message_tokens)]
                 for _ in range(args.turns)] for _ in range(args.conversations)]

    pauses = [[rng.uniform(0, 2 * args.think_s) for _ in range(args.turns)] for _ in range(args.conversations)]

    def conversation(i: int) -> list[tuple[float, int, int]]:
        prompt, turns = list(system), []
        for message, pause in zip(messages[i], pauses[i]):
            time.sleep(pause)  # the user reads and types, while other conversations go on
            prompt += message
            turns.append(one_turn(client, url, prompt, args.max_tokens))
        return turns

    start = time.perf_counter()
    with ThreadPoolExecutor(args.conversations) as pool:
        turns = [turn for conversation_turns in pool.map(conversation, range(args.conversations))
                 for turn in conversation_turns]
    wall = time.perf_counter() - start
    ttfts = sorted(turn[0] for turn in turns)
    return {"cached_share": sum(t[2] for t in turns) / sum(t[1] for t in turns),
            "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))], "seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=32, help="the shared system prompt's length")
    parser.add_argument("--message-tokens", type=int, default=128, help="tokens each turn adds")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens each reply generates")
    parser.add_argument("--think-s", type=float, default=0.5, help="mean pause before each turn (uniform in "
                        "0..2x): without it a closed loop sends a turn back to the replica that just finished the "
                        "last one (one request fewer in flight), whatever the router")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of both routers; medians are reported")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix_routing.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from launcher.ray_env import WORKER_ENV, configure_local_ray
    from launcher.serve_app import build

    export_dir = scratch_dir("prefix_routing_") / "runs" / "bench" / "exports" / "fp32-step000000"
    export_dir.mkdir(parents=True)
    write_export(export_dir, "fp32", LONG_SHAPE)
    configure_local_ray()
    ray.init(num_cpus=args.replicas + 1, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)})
    port = 8000 + (int(time.time()) % 1000)
    url = f"http://127.0.0.1:{port}"
    runs = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=args.conversations))
        for round_index in range(args.repeats):
            for router in ROUTERS:
                serve.run(build({"export_dir": str(export_dir), "num_replicas": args.replicas, "max_batch_size": 8,
                                 "request_router": router}), name="bench", route_prefix="/")
                one_turn(client, url, [300, 301], 2)  # warm-up (one block's worth of nothing to share)
                runs.append({"router": router, **run_workload(client, url, args, seed=round_index)})
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = [{"router": router, **{key: statistics.median(r[key] for r in runs if r["router"] == router)
                                  for key in ("cached_share", "ttft_p50", "ttft_p90", "seconds")}}
            for router in ROUTERS]
    print(f"\n{args.replicas} replicas; {args.conversations} conversations x {args.turns} turns at once, "
          f"{args.system_tokens}-token system prompt, {args.message_tokens} tokens a turn, {args.max_tokens}-token "
          f"replies, {args.think_s} s mean pause; medians of {args.repeats}")
    print(f"\n{'router':>16} {'cached':>7} {'TTFT p50':>9} {'TTFT p90':>9} {'wall':>7}")  # wall: pauses included
    for r in rows:
        print(f"{r['router']:>16} {r['cached_share']:>7.0%} {r['ttft_p50'] * 1000:>7.0f}ms "
              f"{r['ttft_p90'] * 1000:>7.0f}ms {r['seconds']:>6.1f}s")
    base, affinity = rows
    print(f"\nprefix_affinity / power_of_two: TTFT p50 {base['ttft_p50'] / affinity['ttft_p50']:.2f}x faster, "
          f"wall {base['seconds'] / affinity['seconds']:.2f}x")
    write_report(args.out, {"rows": rows, "runs": runs, **vars(args), "out": str(args.out)})


if __name__ == "__main__":
    main()
