"""What guided decoding (response_format, forced tool calls; lm/json_guide.py) costs the engine: decode
tokens/s with a JSON Schema, in json_object mode, with strings under patterns and formats, with a
regex (structured_outputs.regex) and with a GBNF grammar of the same language (structured_outputs.grammar),
against the same requests unguided, in one run.

    .venv/bin/python benchmarks/guided_decoding.py [--threads 2] [--new-tokens 64] [--repeats 3]

Shape of the serving benchmark (GPT-2 style, 6 layers, 384 wide, context 256) with a byte-level BPE
vocabulary of up to 8192 trained on JSON-like text. The weights are random: its own choice is refused
wherever JSON's structure is strict, so the vocabulary mask (the slow path) runs far more often than
with a trained model, and the numbers bound the cost from above. "masked" is the share of tokens that
needed the mask; "cold" builds the grammar anew for each repeat (empty mask cache, a first request's
cost), "warm" reuses it (a replica shares a schema's grammar across requests). Sampled at
temperature 1 with fixed seeds; a guided sequence ends when its document is complete, so tokens/s
counts the tokens each run made.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from lm.config import ModelConfig, padded_vocab_size
from lm.engine import Engine, SamplingParams
from lm.json_guide import JsonGrammar, JsonGuide
from lm.model import GPT
from lm.tokenizer import ByteBPETokenizer

from report import write_report  # benchmarks/ (run as a script)

SCHEMA = {"type": "object", "required": ["name", "age", "unit", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}}}}
PATTERNED = {"type": "object", "required": ["id", "day", "code"], "properties": {  # strings under regexes
    "id": {"type": "string", "format": "uuid"}, "day": {"type": "string", "format": "date"},
    "code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"}}}
REGEX = r"[a-z]+( [a-z]+){0,15}\."  # structured_outputs.regex: raw text, mostly free
GBNF = 'root ::= word (" " word){0,15} "."\nword ::= [a-z]+'  # structured_outputs.grammar: the same language
WORDS = ["alpha", "beta", "gamma", "delta", "name", "age", "value", "items", "true", "false", "null", "return",
         "def", "class", "import", "weather", "city", "Paris", "Rome", "celsius", "tags", "unit"]


def json_like_text(n: int, seed: int = 0) -> list[str]:
    """Documents of JSON, code and prose built from a word list, for a tokenizer to learn."""
    rng = random.Random(seed)
    vocabulary = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                          for _ in range(3000)]
    docs = []
    for _ in range(n):
        words = [rng.choice(vocabulary) for _ in range(8)]
        docs.append(json.dumps({w: rng.choice([rng.randint(-999, 9999), w.upper(), words[:3], None, True])
                                for w in words[:4]}))
        docs.append(f"def {words[0]}({words[1]}):\n    return {words[2]} + {rng.random():.3f}\n")
        docs.append(" ".join(words) + ".\n")
    return docs


def tokens_per_second(engine: Engine, batch: int, new_tokens: int, grammar: JsonGrammar | None) -> float:
    prompts = [[1 + i, 2 + i, 3 + i] for i in range(batch)]
    params = [SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=i, grammar=grammar) for i in range(batch)]
    start = time.perf_counter()
    seqs = engine.generate(prompts, params)
    return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guided_decoding.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = ByteBPETokenizer.train(json_like_text(4000), 8192)
    torch.manual_seed(0)
    model = GPT(ModelConfig(name="bench", variant="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256,
                            vocab_size=padded_vocab_size(tokenizer.vocab_size))).eval()
    engine = Engine(model, tokenizer, max_batch_size=8)
    tokenizer.token_bytes()  # built once per tokenizer, when a replica's first guided request comes

    masked = {"calls": 0}
    real_mask = JsonGuide.mask

    def counted_mask(self, table):
        masked["calls"] += 1
        return real_mask(self, table)

    JsonGuide.mask = counted_mask
    warm_schema = JsonGrammar(SCHEMA)
    cases = {"unguided": lambda: None, "json_schema, cold": lambda: JsonGrammar(SCHEMA),
             "json_schema, warm": lambda: warm_schema, "json_object, cold": lambda: JsonGrammar(None),
             "patterns, cold": lambda: JsonGrammar(PATTERNED), "regex, cold": lambda: JsonGrammar.regex(REGEX),
             "grammar, cold": lambda: JsonGrammar.ebnf(GBNF)}
    results, shares, samples = {}, {}, {}
    tokens_per_second(engine, 1, 8, None)  # warm-up
    tokens_per_second(engine, 1, args.new_tokens, warm_schema)  # fills the warm grammar's cache
    for batch in (1, 8):
        runs: dict[str, list[float]] = {name: [] for name in cases}
        counts: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, grammar in cases.items():  # alternating, so drift hits every case alike
                masked["calls"] = 0
                start_tokens = time.perf_counter()
                rate = tokens_per_second(engine, batch, args.new_tokens, grammar())
                elapsed = time.perf_counter() - start_tokens
                runs[name].append(rate)
                counts[name].append(masked["calls"] / max(1.0, rate * elapsed))
        for name in cases:
            key = f"{name} @ batch {batch}"
            results[key], shares[key], samples[key] = statistics.median(runs[name]), statistics.median(counts[name]), runs[name]
    JsonGuide.mask = real_mask

    print(f"\nvocabulary {tokenizer.vocab_size} tokens, random weights, up to {args.new_tokens} tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'decode':<34} {'tokens/s':>9} {'vs unguided':>12} {'masked':>7}")
    for key, rate in results.items():
        base = results[f"unguided @ batch {key.rsplit(' ', 1)[-1]}"]
        print(f"{key:<34} {rate:>9.1f} {rate / base:>11.2f}x {shares[key]:>6.0%}")
    write_report(args.out, {"tokens_per_second": results, "masked_share": shares, "samples": samples,
                            "vocab_size": tokenizer.vocab_size, "new_tokens": args.new_tokens, "repeats": args.repeats})


if __name__ == "__main__":
    main()
