"""Serving over HTTP: aggregate decode tokens/s at 1, 4, 16 and 64 concurrent streams and time to
first token (p50/p99), through the real Ray Serve app on 127.0.0.1.

    .venv/bin/python benchmarks/serve_throughput.py [--max-tokens 32] [--requests-per-stream 4] [--compile] [--precision int8]

N streams are N clients, each sending its requests back to back (a closed loop, as llmperf's and
vLLM's concurrency benchmarks do), so N requests stay in flight; `--requests-per-stream 1` measures
one burst of N simultaneous requests instead, whose ramp-up then weighs on the result.

The model is the decode benchmark's shape (6 layers, 384 wide, vocab 8192) with random weights and
a byte-level BPE tokenizer trained on a slice of the standard library. Every request streams
greedy tokens for a short code prompt; tokens are the server's own count (the usage chunk that
`stream_options: {"include_usage": true}` asks for).
Traffic stays on loopback and every loop is bounded by the stream counts below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from lm.config import ModelConfig
from lm.export import export_state
from lm.model import GPT
from lm.tokenizer import ByteBPETokenizer

from decode_throughput import SHAPE  # the same model shape as the decode benchmark (run as a script)
from report import scratch_dir, write_report

STREAMS = (1, 4, 16, 64)


def write_export(directory: Path, precision: str, shape: dict = SHAPE) -> None:
    """An export of a model of `shape` with random weights (the decode benchmark's by default)."""
    from safetensors.torch import save_file

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:80]]
    ByteBPETokenizer.train(iter(texts), vocab_size=shape["vocab_size"]).save(directory / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**shape))
    save_file(export_state(model.state_dict(), precision), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model": dataclasses.asdict(model.cfg), "precision": precision}))
    (directory / "export.json").write_text(json.dumps({"precision": precision, "note": "benchmark, random weights"}))


def streamed_completion(client: httpx.Client, url: str, prompt, max_tokens: int):
    """The chunks of one greedy streaming completion, each as it arrives, the last carrying the server's
    own usage (`stream_options.include_usage`)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def one_stream(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """(seconds to the first text chunk, tokens generated, text chunks received) for one streaming
    request; the token count is the server's own."""
    start = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    for chunk in streamed_completion(client, url, prompt, max_tokens):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"][0]["text"]:
            first = first if first is not None else time.perf_counter() - start
            chunks += 1
    return first or 0.0, tokens, chunks


def measure(client: httpx.Client, url: str, streams: int, max_tokens: int, requests_per_stream: int) -> dict:
    """`streams` concurrent clients, each sending `requests_per_stream` streaming requests back to back
    (closed loop, so `streams` requests stay in flight): aggregate tokens/s and chunks/s over the whole
    run, and time to first token over every request. One request per stream measures a single burst."""
    def client_loop(i: int) -> list[tuple[float, int, int]]:
        return [one_stream(client, url, f"def function_{i}_{r}(self, value):\n    ", max_tokens)
                for r in range(requests_per_stream)]

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = [r for loop in pool.map(client_loop, range(streams)) for r in loop]
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"streams": streams, "tokens": sum(r[1] for r in results), "seconds": wall,
            "tokens_per_second": sum(r[1] for r in results) / wall,
            "chunks_per_second": sum(r[2] for r in results) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def replica_split() -> list[dict]:
    """Each model replica's share of the whole run, from its engine metrics on this Ray's Prometheus
    endpoint (launcher/serve_metrics.py): requests, tokens, mean time to first token and per output token."""
    import re

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    replicas: dict[str, dict] = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines():
        found = re.match(r"ray_lm_(\w+)\{(.*)\} (\S+)$", line)
        replica = found and re.search(r'replica="([^"]+)"', found[2])
        if replica and 'le="' not in found[2]:
            values = replicas.setdefault(replica[1], {})
            values[found[1]] = values.get(found[1], 0.0) + float(found[3])
    rows = []
    for replica, v in sorted(replicas.items()):
        requests = v.get("time_to_first_token_seconds_count", 0)
        rows.append({"replica": replica, "requests": int(requests), "tokens": int(v.get("generation_tokens_total", 0)),
                     "ttft_mean": v.get("time_to_first_token_seconds_sum", 0) / max(requests, 1),
                     "tpot_mean": v.get("time_per_output_token_seconds_sum", 0) /
                     max(v.get("time_per_output_token_seconds_count", 0), 1)})
    return rows


def median_row(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) if key != "streams" else runs[0][key] for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=list(STREAMS), help="concurrent stream counts; the ratio column is against the first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all stream counts; medians are reported")
    parser.add_argument("--requests-per-stream", type=int, default=4,
                        help="requests each stream sends back to back (1: one burst of simultaneous requests)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs (and torch threads) per replica; serving's default")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas; the ingress spreads requests")
    parser.add_argument("--stream-interval-ms", type=int, default=40)
    parser.add_argument("--stream-events-per-s", type=int, default=100, help="0: no cap (each stream every interval)")
    parser.add_argument("--compile", action="store_true", help="serve.compile: the decode step compiled at start-up")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32", help="the served export's")
    parser.add_argument("--prefix-cache-tokens", type=int, default=None, help="serve.prefix_cache_tokens (0: off); "
                        "default: serving's")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="serve.max_num_batched_tokens; "
                        "default: serving's")
    parser.add_argument("--request-router", choices=("power_of_two", "prefix_affinity"), default="power_of_two",
                        help="serve.request_router (with several replicas)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_throughput.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from launcher.ray_env import WORKER_ENV, configure_local_ray
    from launcher.serve_app import build

    workdir = scratch_dir("serve_bench_")
    export_dir = workdir / "runs" / "bench" / "exports" / f"{args.precision}-step000000"
    export_dir.mkdir(parents=True)
    write_export(export_dir, args.precision)
    configure_local_ray()
    # As launcher.serve (make serve) starts Ray; with several replicas their metrics are reported each second
    # (Ray's default: 10 s), to be read back at the end.
    ray.init(num_cpus=args.replicas * args.cpus + 1, include_dashboard=False,
             runtime_env={"env_vars": dict(WORKER_ENV)},
             _system_config={"metrics_report_interval_ms": 1000} if args.replicas > 1 else None)
    port = 8000 + (int(time.time()) % 1000)
    rows, split = [], []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"export_dir": str(export_dir), "max_batch_size": args.max_batch_size,
                         "cpus_per_replica": args.cpus, "num_replicas": args.replicas, "stream_interval_ms": args.stream_interval_ms,
                         "stream_events_per_s": args.stream_events_per_s, "compile": args.compile,
                         "prefix_cache_tokens": args.prefix_cache_tokens,
                         "max_num_batched_tokens": args.max_num_batched_tokens,
                         "request_router": args.request_router}),
                  name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        # One client, its connections reused: a client per request spends the shared cores on setup.
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=max(args.streams)))
        one_stream(client, url, "def main(", 4)  # warm-up
        # The machine is noisy: every stream count is measured once per round, and rounds repeat.
        for _ in range(args.repeats):
            for n in args.streams:
                rows.append(measure(client, url, n, args.max_tokens, args.requests_per_stream))
        if args.replicas > 1:
            time.sleep(2.5)  # the replicas' last metrics reported
            split = replica_split()
    finally:
        serve.shutdown()
        ray.shutdown()

    runs = rows
    rows = [median_row([r for r in runs if r["streams"] == n]) for n in args.streams]
    single = rows[0]["tokens_per_second"]
    print(f"\nmedians of {args.repeats} rounds, {args.requests_per_stream} requests per stream, {args.max_tokens} "
          f"greedy tokens per request; {args.precision}"
          f"{', compiled step' if args.compile else ''}")
    print(f"\n{'streams':>7} {'tokens/s':>9} {'vs 1 stream':>11} {'chunks/s':>9} {'TTFT p50':>9} {'TTFT p99':>9}")
    for r in rows:
        print(f"{r['streams']:>7} {r['tokens_per_second']:>9.1f} {r['tokens_per_second'] / single:>10.2f}x "
              f"{r['chunks_per_second']:>9.1f} {r['ttft_p50'] * 1000:>7.0f}ms {r['ttft_p99'] * 1000:>7.0f}ms")
    if split:  # means are a replica's per request (histogram sums: bucket midpoints, so approximate)
        print(f"\n{'replica':>10} {'requests':>9} {'tokens':>7} {'TTFT mean':>10} {'per token':>10}   (the whole run)")
        for r in split:
            print(f"{r['replica']:>10} {r['requests']:>9} {r['tokens']:>7} {r['ttft_mean'] * 1000:>8.0f}ms "
                  f"{r['tpot_mean'] * 1000:>8.1f}ms")
    write_report(args.out, {"rows": rows, "runs": runs, "replica_split": split, "repeats": args.repeats, "max_tokens": args.max_tokens,
                            "requests_per_stream": args.requests_per_stream,
                            "max_batch_size": args.max_batch_size, "cpus": args.cpus, "replicas": args.replicas,
                            "stream_interval_ms": args.stream_interval_ms,
                            "stream_events_per_s": args.stream_events_per_s, "compile": args.compile,
                            "precision": args.precision, "prefix_cache_tokens": args.prefix_cache_tokens,
                            "max_num_batched_tokens": args.max_num_batched_tokens,
                            "request_router": args.request_router})


if __name__ == "__main__":
    main()
