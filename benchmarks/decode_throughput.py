"""Decode tokens/s: our engine at fp32, bf16 and int8, eager and with the decode step compiled
(`serve.compile`), against Hugging Face `generate` on the same weights, in one run, at batch 1 and 8.
Ratios are the result; the machine is noisy, so each cell is the median of several repeats.

    .venv/bin/python benchmarks/decode_throughput.py [--threads 2] [--new-tokens 64] [--repeats 3] [--no-compile]

Shape from the serving issue: GPT-2 style, 6 layers, 384 wide, 6 heads, vocab 8192, context 256,
random weights (speed does not depend on training). Greedy decoding of --new-tokens tokens after a
16-token prompt; the engine's text decoding is stubbed so both sides measure model + decode loop only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lm.config import ModelConfig
from lm.engine import Engine, SamplingParams
from lm.export import export_state, serving_model
from lm.hf_format import hf_config, to_hf_state_dict
from lm.model import GPT

from report import write_report  # benchmarks/ (run as a script)

SHAPE = dict(name="bench", variant="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)
PROMPT_TOKENS = 16


class TokenIds:
    """A tokenizer stand-in: ids are the text (HF generate does not decode either)."""

    vocab_size, eot_id = SHAPE["vocab_size"], None

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids):
        return ""


def engine_tokens_per_second(engine: Engine, batch: int, new_tokens: int) -> float:
    prompts = [torch.randint(0, SHAPE["vocab_size"], (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(batch)]
    start = time.perf_counter()
    seqs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0))
    elapsed = time.perf_counter() - start
    assert all(len(s.output_ids) == new_tokens for s in seqs)
    return batch * new_tokens / elapsed


def hf_tokens_per_second(model, batch: int, new_tokens: int) -> float:
    ids = torch.stack([torch.randint(0, SHAPE["vocab_size"], (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(i))
                       for i in range(batch)])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_TOKENS + new_tokens
    return batch * new_tokens / elapsed


def build_models(compile: bool):
    import transformers

    torch.manual_seed(0)
    reference = GPT(ModelConfig(**SHAPE)).eval()
    variants = [("fp32", False), ("bf16", False), ("int8", False)] + ([("fp32", True), ("int8", True)] if compile else [])
    ours = {(p, c): serving_model(export_state(reference.state_dict(), p), reference.cfg, p) for p, c in variants}
    config = {k: v for k, v in hf_config(reference.cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    hf.load_state_dict(to_hf_state_dict(reference.state_dict(), reference.cfg), strict=False)
    hf.tie_weights()
    return ours, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled engine rows (~2 min of compiling)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, hf = build_models(not args.no_compile)
    results, compile_seconds = {}, {}
    for batch in (1, 8):
        runners = {}
        for (precision, compile), model in ours.items():
            start = time.perf_counter()
            engine = Engine(model, TokenIds(), max_batch_size=batch, compile=compile)
            name = f"engine {precision}" + (" compiled" if compile else "")
            if compile:
                compile_seconds[f"{name} @ batch {batch}"] = time.perf_counter() - start
            runners[name] = lambda b, engine=engine: engine_tokens_per_second(engine, b, args.new_tokens)
        runners["HF generate fp32"] = lambda b: hf_tokens_per_second(hf, b, args.new_tokens)
        for name, run in runners.items():
            run(batch)  # warm-up
        samples = {name: [] for name in runners}
        for _ in range(args.repeats):  # alternate, so drift hits every row alike
            for name, run in runners.items():
                samples[name].append(run(batch))
        for name in runners:
            results[f"{name} @ batch {batch}"] = statistics.median(samples[name])

    # "vs fp32": against the engine's fp32 row of the same mode (eager or compiled) and batch.
    print(f"\n{'decode (greedy, ' + str(args.new_tokens) + ' new tokens)':<38} {'tokens/s':>10} {'vs HF':>7} {'vs fp32':>8}")
    for key, value in results.items():
        batch = key.rsplit(" ", 1)[-1]
        fp32_ref = results[f"engine fp32{' compiled' if ' compiled ' in key else ''} @ batch {batch}"]
        print(f"{key:<38} {value:>10.1f} {value / results[f'HF generate fp32 @ batch {batch}']:>6.2f}x "
              f"{value / fp32_ref:>7.2f}x")
    for key, seconds in compile_seconds.items():
        print(f"compile (or load from the program cache) + warm-up, {key}: {seconds:.0f} s")
    write_report(args.out, {"results_tokens_per_second": results, "compile_seconds": compile_seconds, "threads": args.threads,
                            "new_tokens": args.new_tokens, "repeats": args.repeats, "shape": SHAPE})


if __name__ == "__main__":
    main()
