"""Chat fine-tuning data: conversations -> a chat template -> ids + loss mask.

Each JSONL line or Parquet/Arrow row is
`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`, ShareGPT's
`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`,
`{"prompt": ..., "completion": ...}` (a user turn and the assistant's answer) or Alpaca's
`{"instruction": ..., "input": ..., "output": ...}` (the input, if any, follows the instruction in
the user turn). A tool-calling conversation (OpenAI's `messages` with assistant `tool_calls` and
"tool" results, and the line's `tools`, a list or its JSON text, as TRL takes them) needs a template
that takes tools: the model's own; the replies that call tools are learned like any other.

A conversation is rendered exactly as the server renders a request
(`lm.chat_template`: the built-in template, or the pretrained model's own) and tokenized in one
piece, as the server tokenizes a prompt; the loss mask then marks the tokens that start inside an
assistant's answer (its content and the marker that ends the reply), so the model learns to answer
and to stop, and never to predict the user's words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lm.chat_template import BUILTIN, ROLES, ChatTemplate
from lm.records import read_records
from lm.tool_calls import template_tool_calls


class Conversation(list):
    """A conversation's messages, with the tools its prompt offered (None for most)."""

    tools: list[dict] | None = None


@dataclass
class BadLine:
    path: Path
    lineno: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name}:{self.lineno} ({self.reason})"


# ShareGPT's speakers (`conversations` of {"from", "value"}, as OpenHermes and SlimOrca store them).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def parse_conversation(record) -> list[dict]:
    """The messages of one record, in any of the layouts chat datasets use: OpenAI's `messages` of
    {role, content}; ShareGPT's `conversations` of {from, value} (human/gpt) or of {role, content};
    `prompt` + `completion`; Alpaca's `instruction` (+ `input`) + `output`. Raises ValueError saying
    what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    conversation = Conversation(_parse_messages(record))
    conversation.tools = _tools(record.get("tools"))
    return conversation


def _parse_messages(record: dict) -> list[dict]:
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
    elif "conversations" in record:
        messages = _messages(record["conversations"], "conversations")
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    elif isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError("input must be a string")
        instruction = record["instruction"] + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ValueError('needs "messages" (or ShareGPT\'s "conversations"), "prompt" and "completion", '
                         'or "instruction" and "output"')
    if not any(m["role"] == "assistant" and (m["content"] or m.get("tool_calls")) for m in messages):
        raise ValueError("no non-empty assistant message to learn from")
    return messages


def _tools(tools) -> list[dict] | None:
    """A line's `tools`: a list of tool schemas, or that list's JSON text (as some datasets store it)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise ValueError("tools is text that is not JSON") from None
    if tools in (None, []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of tool schemas ({type: function, function: {name, parameters}})")
    return tools


def _messages(turns, field: str) -> list[dict]:
    """OpenAI's {role, content} messages, or ShareGPT's {from, value} turns, as {role, content}."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{field} must be a non-empty list")
    messages = []
    for turn in turns:
        if isinstance(turn, dict) and "from" in turn and field == "conversations":
            role, content = SHAREGPT_ROLES.get(turn["from"]), turn.get("value")
        else:
            role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, dict) else (None, None)
        if role == "assistant" and isinstance(turn, dict) and turn.get("tool_calls"):
            messages.append({"role": role, "content": content if isinstance(content, str) else "",
                             "tool_calls": template_tool_calls(turn["tool_calls"])})
            continue
        if role not in (*ROLES, "tool") or not isinstance(content, str):
            allowed = "/".join((*ROLES, "tool"))
            allowed += "" if field == "messages" else f" (or from: {'/'.join(SHAREGPT_ROLES)})"
            raise ValueError(f"each of {field} needs role in {allowed} and string content")
        messages.append({"role": role, "content": content} if role != "tool" else
                        {"role": role, "content": content, "tool_call_id": turn.get("tool_call_id")})
    return messages


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
                if not template.takes_tools and (conversation.tools or any(
                        m["role"] == "tool" or "tool_calls" in m for m in conversation)):
                    raise ValueError("tool calls need a chat template that takes tools (a model's own, as Qwen's "
                                     "or Llama 3.1's); this one takes none")
                if not template.is_builtin:
                    template.answer_spans(conversation, conversation.tools)
            except ValueError as error:  # ChatTemplateError included
                bad.append(BadLine(path, lineno, str(error)))
                continue
            yield conversation


def render_with_answer_spans(messages: list[dict], template: ChatTemplate = BUILTIN
                             ) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans the model is trained to produce (with the tools
    a Conversation's prompt offered)."""
    return template.answer_spans(messages, getattr(messages, "tools", None))


def tokenize_conversation(tokenizer, messages: list[dict], template: ChatTemplate = BUILTIN
                          ) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is an answer token (carries loss as a target)."""
    text, spans = render_with_answer_spans(messages, template)
    ids, starts = tokenizer.encode_with_offsets(text)
    mask = [any(a <= s < b for a, b in spans) for s in starts]
    return ids, mask
