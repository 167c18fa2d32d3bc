"""Chat fine-tuning data: conversations -> a chat template -> ids + loss mask.

Each JSONL line or Parquet/Arrow row is either
`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}` or
`{"prompt": ..., "completion": ...}` (a user turn and the assistant's answer). A conversation is
rendered exactly as the server renders a request (`lm.chat_template`: the built-in template, or the
pretrained model's own) and tokenized in one piece, as the server tokenizes a prompt; the loss mask
then marks the tokens that start inside an assistant's answer (its content and the marker that ends
the reply), so the model learns to answer and to stop, and never to predict the user's words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lm.chat_template import BUILTIN, ROLES, ChatTemplate
from lm.records import read_records


@dataclass
class BadLine:
    path: Path
    lineno: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name}:{self.lineno} ({self.reason})"


def parse_conversation(record) -> list[dict]:
    """The messages of one JSONL record; raises ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"each message needs role in {'/'.join(ROLES)} and string content")
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise ValueError("no non-empty assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        if not record["completion"]:
            raise ValueError("empty completion")
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
    raise ValueError('needs "messages", or "prompt" and "completion"')


def iter_conversations(files: list[Path], bad: list[BadLine], template: ChatTemplate = BUILTIN
                       ) -> Iterator[list[dict]]:
    """Each good conversation, in order, from JSONL files (blank lines skipped) or Parquet/Arrow files (a
    row each, with a `messages` column of {role, content} structs, or `prompt` and `completion`); each
    bad line (a conversation the template refuses too) goes to `bad` instead. Read a record at a time.
    Raises UnreadableFile for a file that cannot be read at all."""
    for path in files:
        for lineno, record in read_records(path):
            try:
                if isinstance(record, json.JSONDecodeError):
                    raise ValueError("invalid JSON")
                conversation = parse_conversation(record)
                if not template.is_builtin:
                    template.answer_spans(conversation)
            except ValueError as error:  # ChatTemplateError included
                bad.append(BadLine(path, lineno, str(error)))
                continue
            yield conversation


def render_with_answer_spans(messages: list[dict], template: ChatTemplate = BUILTIN
                             ) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans the model is trained to produce."""
    return template.answer_spans(messages)


def tokenize_conversation(tokenizer, messages: list[dict], template: ChatTemplate = BUILTIN
                          ) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is an answer token (carries loss as a target)."""
    text, spans = render_with_answer_spans(messages, template)
    ids, starts = tokenizer.encode_with_offsets(text)
    mask = [any(a <= s < b for a, b in spans) for s in starts]
    return ids, mask
