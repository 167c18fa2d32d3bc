"""A quick look at a model from a terminal, no server needed:

    python -m launcher.generate <export dir | training checkpoint dir> --prompt "def main(" --max-tokens 64
    python -m launcher.generate outputs/runs/<run> --num-samples 3 --temperature 0.8 --top-k 50 --seed 1
    python -m launcher.generate ~/models/SmolLM2-135M --prompt "The capital of France"   # before fine-tuning
    python -m launcher.generate ~/models/Qwen2.5-0.5B-Instruct --chat "Capital of France?"  # its chat template
    python -m launcher.generate <model> --chat "A city as JSON" --json-schema city.json  # guided: JSON matching it
    python -m launcher.generate <model> --prompt "Date: " --regex '\d{4}-\d{2}-\d{2}'   # guided: text it matches
    python -m launcher.generate <model> --prompt "Answer: " --grammar answer.gbnf      # guided: a GBNF grammar

A run directory means its newest export, or else its latest checkpoint. Any of the three may be in
an object store (`s3://bucket/runs/<run>`): it is downloaded to a temporary directory first. A local
Hugging Face model directory (what `trainer.init_from` takes) is loaded as a fine-tune would start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def load(path: str | Path):
    """(model, tokenizer, what was loaded) from an export, a checkpoint or a run directory (or URI)."""
    from launcher.run_dir import is_uri

    if is_uri(str(path)):
        with tempfile.TemporaryDirectory(prefix="lmstack-load-") as scratch:
            local, chosen = download_model_dir(str(path), scratch)
            model, tokenizer, _ = load(local)
            return model, tokenizer, chosen
    path = Path(path)
    from lm.checkpoint import find_latest_checkpoint, is_complete, load_model
    from lm.export import is_complete_export, load_export

    if (path / "exports").is_dir() or find_latest_checkpoint(path) is not None:  # a run directory
        exports = [p for p in (path / "exports").glob("*") if is_complete_export(p)] if (path / "exports").is_dir() else []
        path = max(exports, key=lambda p: p.stat().st_mtime) if exports else find_latest_checkpoint(path)
    if is_complete_export(path):
        model, tokenizer, _, _ = load_export(path)
    elif is_complete(path):
        model, tokenizer, _ = load_model(path)
    elif (path / "config.json").is_file():  # a Hugging Face model directory
        from lm.pretrained import load_hf_directory

        model, tokenizer = load_hf_directory(path)
    else:
        raise FileNotFoundError(f"{path} is neither an export, a training checkpoint, a run directory with one, "
                                "nor a Hugging Face model directory")
    return model, tokenizer, path


def download_model_dir(location: str, scratch: str) -> tuple[Path, str]:
    """A run's newest export or latest checkpoint, or an export or checkpoint itself, in an object
    store: a local copy, and the location it came from."""
    from launcher.run_dir import RunDir, local_directory
    from lm.remote_files import split_query

    bare, query = split_query(location)
    storage, _, name = bare.rstrip("/").rpartition("/")
    run = RunDir(storage + query, name)
    exports = run.exports()
    latest = None if exports else run.latest_checkpoint()
    chosen = max(exports)[1] if exports else run.where(latest) if latest else location
    return local_directory(chosen, scratch), chosen


def guided_grammar(args: argparse.Namespace):
    from lm.json_guide import JsonGrammar

    if args.json_schema:
        return JsonGrammar(json.loads(args.json_schema.read_text()))
    if args.grammar:
        return JsonGrammar.ebnf(args.grammar.read_text())
    return JsonGrammar.regex(args.regex) if args.regex is not None else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}" if __spec__ else None, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="an export, a training checkpoint or a run directory (a path or a URI), "
                                     "or a local Hugging Face model directory")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue")
    prompt.add_argument("--chat", help="a user message: prints the model's reply, prompted with its chat template "
                                       "(a pretrained model's own, else the built-in one)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50, help="0: no top-k, as Hugging Face's generate() takes it")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="as Hugging Face's generate() takes it")
    parser.add_argument("--seed", type=int, default=0)
    guided = parser.add_mutually_exclusive_group()
    guided.add_argument("--json-schema", type=Path, help="a JSON Schema file: samples are guided to JSON that matches "
                                                         "it, as serving's response_format (lm/json_guide.py)")
    guided.add_argument("--regex", help="samples are guided to text the regex matches whole, as serving's "
                                        "structured_outputs.regex (lm/regex_guide.py)")
    guided.add_argument("--grammar", type=Path, help="a GBNF grammar file: samples are guided to text it matches, as "
                                                     "serving's structured_outputs.grammar (lm/ebnf_guide.py)")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.top_k < 0:
        bad = f"--num-samples={args.num_samples}: must be >= 1" if args.num_samples < 1 else \
            f"--top-k={args.top_k}: must be >= 0 (0: no top-k)"
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lm.chat_template import BUILTIN, ChatTemplateError
    from lm.config import ConfigError
    from lm.engine import Engine, RequestError, SamplingParams
    from lm.json_guide import SchemaError
    from lm.tokenizer import document_start

    try:
        grammar = guided_grammar(args)
        model, tokenizer, source = load(args.path)
        # Token ids: a text prompt as `tokenizer(prompt)` encodes it (a Llama tokenizer's BOS first), a chat
        # template's text as it is (the template writes BOS itself).
        prompt, stop = tokenizer.encode(args.prompt, add_special_tokens=True) or document_start(tokenizer), []
        if args.chat is not None:
            template = tokenizer.chat_template or BUILTIN
            prompt = tokenizer.encode(template.render([{"role": "user", "content": args.chat}]))
            stop = [template.end_of_turn]
        # Caches as long as this prompt and answer need, not the model's whole context (131,072 for Llama 3.2).
        needed = len(prompt) + args.max_tokens
        fits = args.max_tokens >= 1 and needed <= model.cfg.block_size  # else the engine names what does not fit
        engine = Engine(model, tokenizer, max_batch_size=args.num_samples, max_model_len=needed if fits else None)
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None,
                                 top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                 seed=args.seed + i, stop=stop, grammar=grammar)
                  for i in range(args.num_samples)]
        samples = engine.generate([prompt] * args.num_samples, params)
    except (FileNotFoundError, RequestError, ConfigError, ChatTemplateError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (SchemaError, json.JSONDecodeError) as error:
        given = (f"--json-schema {args.json_schema}" if args.json_schema else f"--grammar {args.grammar}"
                 if args.grammar else f"--regex {args.regex}")
        print(f"error: {given}: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"# {source}", file=sys.stderr)
    for seq in samples:
        print(f"{'' if args.chat is not None else args.prompt}{seq.text}\n{'-' * 60}")


if __name__ == "__main__":
    main()
