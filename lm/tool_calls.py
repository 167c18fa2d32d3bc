"""Tool calls in a model's reply: which format a chat template asks its model to write them in, and
the calls read back out of the reply's text (as vLLM's tool-call parsers read them).

A template that takes `tools` tells the model how to call them. The formats of the common
instruct families, each found by what its template writes:
- `hermes` (Qwen2.5/3, Hermes, SmolLM3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  one block a call, after any text;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- `json` (Llama 3.1-3.3): the whole reply one JSON object `{"name": ..., "parameters": {...}}`
  (several separated by `;`), optionally after `<|python_tag|>`.
A reply whose calls are not valid JSON is text, as vLLM returns it. A forced call (OpenAI's
`tool_choice` "required" or a named function) is guided to a JSON list of {"name", "parameters"}
objects instead, as vLLM guides it: the forms `required` and `named`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"
FORCED = ("required", "named")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI's API carries it

    def openai(self, index: int | None = None) -> dict:
        """As OpenAI's API returns it; a streamed call carries its `index` among the reply's calls."""
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def tool_format(template_source: str, takes_tools: bool) -> str | None:
    """The format a template's model calls tools in; None for a template that does not take tools."""
    if not takes_tools:
        return None
    if "<tool_call>" in template_source:
        return "hermes"
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    return "json"


def calls_start(text: str, form: str) -> int | None:
    """Where the reply's tool calls begin (a server streams the text before it), None if they have not
    (yet): also where the text's end could still become the start of one, so that it is held back."""
    if form in FORCED:
        return 0  # the whole reply is the calls
    if form == "json":
        stripped = text.lstrip()
        for opening in (PYTHON_TAG, "{"):
            if stripped.startswith(opening) or (stripped and opening.startswith(stripped)):
                return 0
        return None
    marker = "<tool_call>" if form == "hermes" else "[TOOL_CALLS]"
    found = text.find(marker)
    if found != -1:
        return found
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return len(text) - length
    return None


def parse_tool_calls(text: str, form: str) -> tuple[str | None, list[ToolCall]]:
    """(the reply's text before its calls, or None if there is none; its calls). A reply without calls,
    or with calls that are not valid JSON, is all text."""
    try:
        if form in FORCED:
            found = json.loads(text)
            calls = [_call(call) for call in (found if isinstance(found, list) else [found])]
            content = ""
        elif form == "hermes":
            start = text.find("<tool_call>")
            if start == -1:
                return text, []
            calls = [_call(json.loads(block)) for block in HERMES_CALL.findall(text[start:])]
            content = text[:start]
        elif form == "mistral":
            start = text.find("[TOOL_CALLS]")
            if start == -1:
                return text, []
            found = json.loads(text[start + len("[TOOL_CALLS]"):].strip())
            calls = [_call(call) for call in (found if isinstance(found, list) else [found])]
            content = text[:start]
        else:
            body = text.strip().removeprefix(PYTHON_TAG).strip()
            if not body.startswith("{"):
                return text, []
            calls = [_call(json.loads(part)) for part in _json_objects(body)]
            content = ""
    except (json.JSONDecodeError, TypeError, KeyError, ValueError):
        return text, []
    return (content if content.strip() else None), calls


def calls_finish_reason(form: str, finish_reason: str) -> str:
    """A reply that made calls finishes with "tool_calls", except a call forced by name: "stop", as
    OpenAI's and vLLM's do."""
    return finish_reason if form == "named" else "tool_calls"


def template_tool_calls(calls) -> list[dict]:
    """An assistant message's OpenAI `tool_calls` as templates take them: each call's JSON `arguments`
    text parsed to an object (Qwen's and Llama's templates write `arguments | tojson`), as vLLM and
    TRL hand them over. Raises ValueError for calls without a function name."""
    functions = [call.get("function") if isinstance(call, dict) else None for call in calls] \
        if isinstance(calls, list) and calls else [None]
    if not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions):
        raise ValueError("tool_calls must be a non-empty list of {id, type: function, function: {name, arguments}}")
    rendered = []
    for call, function in zip(calls, functions):
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # the template gets the text as sent
        rendered.append({"id": call.get("id"), "type": "function",
                         "function": {"name": function["name"], "arguments": arguments}})
    return rendered


def _call(found) -> ToolCall:
    if not isinstance(found, dict) or not isinstance(found.get("name"), str):
        raise ValueError("a tool call needs a name")
    arguments = found.get("arguments", found.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(found["name"], arguments)


def _json_objects(body: str) -> list[str]:
    """Llama's calls: one JSON object, or several separated by `;`."""
    try:
        json.loads(body)
        return [body]
    except json.JSONDecodeError:
        return [part for part in body.split(";") if part.strip()]
