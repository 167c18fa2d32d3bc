"""Time to first token with the engine's prefix cache (`serve.enable_prefix_caching`) against without,
in one run, on the two workloads it is for:

- shared system prompt: requests that start with the same system prompt and differ after it;
- multi-turn chat: each turn resends the conversation so far (prompts and replies) plus a new message.

    .venv/bin/python benchmarks/prefix_cache.py [--threads 2] [--system-tokens 512] [--turns 6] [--repeats 3]

Shape: the decode benchmark's GPT-2 (6 layers, 384 wide, vocab 8192) with a 1,024-token context,
random weights. Time to first token is one engine step that admits the request: its prefill (after
the cached blocks, with the cache) and the first sampled token. Each cell is a median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lm.config import ModelConfig
from lm.engine import Engine, SamplingParams
from lm.model import GPT

from decode_throughput import TokenIds
from report import write_report  # benchmarks/ (run as a script)

SHAPE = dict(name="bench", variant="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=1024, vocab_size=8192)
MESSAGE_TOKENS = 32  # a user's message, and a reply's length


def long_context_model(threads: int) -> GPT:
    """The benchmarks' model (random weights), with torch on `threads` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return GPT(ModelConfig(**SHAPE)).eval()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, SHAPE["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_token_ms(engine: Engine, prompt: list[int], reply_tokens: int = 1) -> tuple[float, list[int]]:
    """The step that prefills the prompt and samples its first token, timed; then the rest of the reply."""
    seq = engine.submit(prompt, SamplingParams(max_tokens=reply_tokens, temperature=0))
    start = time.perf_counter()
    engine.step()
    elapsed = (time.perf_counter() - start) * 1000
    while not seq.finished:
        engine.step()
    return elapsed, seq.output_ids


def shared_system_prompt(engine: Engine, system_tokens: int, requests: int, seed: int) -> float:
    """Median time to first token of requests after the first, which all start with one system prompt."""
    system = random_ids(system_tokens, seed)
    times = [first_token_ms(engine, system + random_ids(MESSAGE_TOKENS, seed * 100 + i))[0] for i in range(requests)]
    return statistics.median(times[1:])


def multi_turn(engine: Engine, system_tokens: int, turns: int, seed: int) -> float:
    """Median time to first token of turns after the first: each prompt is the conversation so far."""
    conversation, times = random_ids(system_tokens, seed), []
    for turn in range(turns):
        conversation += random_ids(MESSAGE_TOKENS, seed * 100 + turn)
        elapsed, reply = first_token_ms(engine, conversation, MESSAGE_TOKENS)
        times.append(elapsed)
        conversation += reply
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix_cache.json"))
    args = parser.parse_args()
    model = long_context_model(args.threads)
    context = SHAPE["block_size"]
    workloads = {"shared system prompt": lambda e, s: shared_system_prompt(e, args.system_tokens, args.requests, s),
                 "multi-turn chat": lambda e, s: multi_turn(e, args.system_tokens, args.turns, s)}
    results = {}
    for name, run in workloads.items():
        samples = {"no cache": [], "prefix cache": []}
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            for label, tokens in (("no cache", 0), ("prefix cache", 4 * context)):  # alternate: drift hits both
                engine = Engine(model, TokenIds(), max_batch_size=1, prefix_cache_tokens=tokens)
                value = run(engine, repeat + 1)
                if repeat:
                    samples[label].append(value)
        results[name] = {label: statistics.median(values) for label, values in samples.items()}

    print(f"\n{'time to first token (ms, median)':<34} {'no cache':>9} {'prefix cache':>13} {'speed-up':>9}")
    for name, row in results.items():
        print(f"{name:<34} {row['no cache']:>9.1f} {row['prefix cache']:>13.1f} "
              f"{row['no cache'] / row['prefix cache']:>8.2f}x")
    write_report(args.out, {"results_ms": results, "threads": args.threads, "system_tokens": args.system_tokens,
                            "requests": args.requests, "turns": args.turns, "message_tokens": MESSAGE_TOKENS,
                            "repeats": args.repeats, "shape": SHAPE})


if __name__ == "__main__":
    main()
