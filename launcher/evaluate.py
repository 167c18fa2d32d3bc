"""Score a model on held-out text from a terminal: loss, perplexity and next-token accuracy.

    python -m launcher.evaluate <export dir | training checkpoint dir | run dir> --data 'held_out/*.txt'
    python -m launcher.evaluate outputs/runs/<run> --data notes.md --max-tokens 100000 --json scores.json
    python -m launcher.evaluate ~/models/Llama-3.2-1B --data held_out/ --context 2048   # before fine-tuning
    python -m launcher.evaluate ~/models/Qwen2.5-0.5B-Instruct --chat --data val_chats.jsonl   # answers only

`--data` takes what `data.path` takes (files, directories, globs, URIs; comma separated). The text
is tokenized with the model's own tokenizer, a batch of documents at a time, into a temporary file
(up to --max-tokens), which is then read in consecutive windows of the model's context, or of
--context tokens (`lm.evaluation`). A run directory means its newest export, or else its latest
checkpoint, and any of them may be a URI (`s3://bucket/runs/<run>`), as for `launcher.generate`; a
local Hugging Face model directory is scored as a fine-tune from it would start.

With `--chat`, `--data` holds conversations (any layout `data=chat` reads): each is rendered with the
model's chat template (a pretrained model's own, else the built-in one) and only the assistant's
answer tokens are scored, as a chat fine-tune's validation counts them: the baseline a fine-tune
is measured against.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path


# lm.corpus names the training settings whose values these flags take.
FLAGS = {"data.path": "--data", "data.text_field": "--text-field"}


def flag_message(message: str) -> str:
    """lm.corpus's words, naming this command's flags: "data.path='x' does not exist" -> "--data 'x' ...",
    "... set data.text_field=body" -> "... set --text-field body", "data.path item 'x'" -> "--data item 'x'"."""
    for setting, flag in FLAGS.items():
        message = message.replace(f"{setting}=", f"{flag} ").replace(setting, flag)
    return message


def data_files(data) -> list[Path]:
    """lm.corpus.corpus_files, with its note on a directory's unread files naming --data."""
    from lm.corpus import corpus_files

    note = io.StringIO()
    try:
        with contextlib.redirect_stderr(note):
            return corpus_files(data)
    finally:
        print(flag_message(note.getvalue()), end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}" if __spec__ else None, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="an export, a training checkpoint or a run directory (a path or a URI), "
                                     "or a local Hugging Face model directory")
    parser.add_argument("--data", required=True,
                        help="files, directories or globs of .txt/.md/.jsonl/.parquet/.arrow text")
    parser.add_argument("--text-field", default="text",
                        help="the field read from .jsonl lines and .parquet/.arrow rows")
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=None,
                        help="tokens per window (default: the model's context; shorter for a long-context model)")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    parser.add_argument("--chat", action="store_true",
                        help="--data holds conversations: score the assistant's answers, prompted with the chat "
                             "template")
    args = parser.parse_args(argv)
    for flag, value in (("--max-tokens", args.max_tokens), ("--batch-size", args.batch_size), ("--context", args.context)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: must be >= 1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import numpy as np

    from launcher.generate import load
    from lm.config import ConfigError, DataConfig
    from lm.corpus import empty_corpus, iter_documents
    from lm.data import write_tokens
    from lm.evaluation import evaluate_stream

    if args.chat:
        return _score_chats(args)
    data = DataConfig(source="files", path=args.data, text_field=args.text_field)
    with tempfile.TemporaryDirectory(prefix="lmstack-evaluate-") as scratch:
        tokens_file = Path(scratch) / "tokens.bin"
        try:
            files = data_files(data)
            seen_text = False

            def documents():
                nonlocal seen_text
                for doc in iter_documents(files, data):
                    seen_text = seen_text or bool(doc.strip())
                    yield doc

            docs = documents()
            first = list(itertools.islice(docs, 1))  # a file that cannot be read fails before the model loads
            model, tokenizer, source = load(args.path)
            if args.context and args.context > model.cfg.block_size:
                raise ConfigError(f"--context {args.context} exceeds the model's context ({model.cfg.block_size})")
            count = len(write_tokens(tokenizer, itertools.chain(first, docs), tokens_file, np.int32,
                                     args.max_tokens + 1 if args.max_tokens else None))
            if not seen_text:
                empty_corpus(files, data, "data.path")
        except ConfigError as error:
            print(f"error: {flag_message(str(error))}", file=sys.stderr)
            sys.exit(2)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        tokens = np.memmap(tokens_file, dtype=np.int32, mode="r")
        scores = evaluate_stream(model.eval(), tokens, args.context or model.cfg.block_size, args.batch_size,
                                 args.max_tokens)
        del tokens
    scores.update(source=str(source), data=args.data, documents=count)
    _report(args, scores, "tokens", f"{count} document" + ("s" if count != 1 else ""))


def _score_chats(args) -> None:
    """--chat: the answer tokens of the conversations in --data (bad lines skipped and reported)."""
    from launcher.generate import load
    from lm.chat_data import tokenize_conversation
    from lm.chat_template import BUILTIN
    from lm.config import ConfigError, DataConfig
    from lm.corpus import chat_conversations
    from lm.evaluation import evaluate_conversations

    data = DataConfig(source="chat", path=args.data)
    bad = []
    try:
        files = data_files(data)
        model, tokenizer, source = load(args.path)
        if args.context and args.context > model.cfg.block_size:
            raise ConfigError(f"--context {args.context} exceeds the model's context ({model.cfg.block_size})")
        template = tokenizer.chat_template or BUILTIN
        conversations = (tokenize_conversation(tokenizer, c, template)
                         for c in chat_conversations(files, bad, "data.path", template))
        scores = evaluate_conversations(model.eval(), conversations, args.context or model.cfg.block_size,
                                        args.max_tokens)
    except ConfigError as error:
        print(f"error: {flag_message(str(error))}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, ValueError) as error:  # ValueError: no answer tokens
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if bad:
        listed = ", ".join(str(b) for b in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        print(f"skipped {len(bad)} bad lines: {listed}", file=sys.stderr)
    count = scores["conversations"]
    scores.update(source=str(source), data=args.data, bad_lines=len(bad))
    _report(args, scores, "answer tokens", f"{count} conversation" + ("s" if count != 1 else ""))


def _report(args, scores: dict, what: str, of: str) -> None:
    print(f"# {scores['source']}", file=sys.stderr)
    print(f"{scores['tokens']} {what} of {of}: loss {scores['loss']:.4f}, "
          f"perplexity {scores['perplexity']:.2f}, next-token accuracy {scores['accuracy']:.2%}")
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
