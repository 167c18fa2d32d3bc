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
objects instead, as vLLM guides it: the forms `required` and `named`. A streamed reply's calls are
read while they are written (CallScanner), so that they stream as OpenAI streams them.
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


def calls_begun(text: str, form: str) -> int | None:
    """Where the reply's tool calls certainly begin (a whole marker, or a JSON reply's first character),
    None if they have not: from there a CallScanner reads them while they are written."""
    start = calls_start(text, form)
    if start is None or form in FORCED:
        return start
    if form == "json":
        return start if text.lstrip().startswith((PYTHON_TAG, "{")) else None
    marker = "<tool_call>" if form == "hermes" else "[TOOL_CALLS]"
    return start if text.startswith(marker, start) else None


class JsonRewriter:
    """One JSON value's text, fed a character at a time, rewritten as `json.dumps(value,
    ensure_ascii=False)` writes it (no whitespace, ", " and ": " separators, strings and numbers
    re-encoded), so that a call's arguments streamed as the model writes them add up to what the whole
    reply's parse returns (`ToolCall.arguments`). `done` once a string, object or array has closed; a
    number or literal ends at the delimiter after it (`flush`)."""

    DELIMITERS = ' \t\r\n"{}[],:'

    def __init__(self):
        self.depth, self.in_string, self.done = 0, False, False
        self.escape = self.high_surrogate = self.scalar = ""

    def feed(self, char: str) -> str:
        if self.in_string:
            return self._string_char(char)
        if char not in self.DELIMITERS:  # part of a number or a literal
            self.scalar += char
            return ""
        out = self.flush()
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        elif char in ",:":
            return out + char + " "
        else:  # whitespace
            return out
        return out + char

    def flush(self) -> str:
        """A pending number or literal, re-encoded (as it was, if it is not valid JSON)."""
        scalar, self.scalar = self.scalar, ""
        try:
            return json.dumps(json.loads(scalar)) if scalar else ""
        except json.JSONDecodeError:
            return scalar

    def _string_char(self, char: str) -> str:
        if self.escape:
            self.escape += char
            if (len(self.escape) == 2 and char != "u") or len(self.escape) == 6:
                escape, self.escape = self.escape, ""
                if len(escape) == 6 and not self.high_surrogate and _is_high_surrogate(escape):
                    self.high_surrogate = escape  # decoded together with the low half after it
                    return ""
                return self._decoded(self._take_high_surrogate() + escape)
            return ""
        if char == "\\":  # an escape, perhaps the low half of a held high surrogate
            self.escape = char
            return ""
        out = self._decoded(self._take_high_surrogate())
        if char == '"':
            self.in_string = False
            self.done = self.depth == 0
            out += char
        else:
            out += char if char >= " " else self._decoded(char)  # json.dumps escapes only control characters here
        return out

    def _take_high_surrogate(self) -> str:
        escape, self.high_surrogate = self.high_surrogate, ""
        return escape

    @staticmethod
    def _decoded(raw: str) -> str:
        try:
            return json.dumps(json.loads(f'"{raw}"'), ensure_ascii=False)[1:-1] if raw else ""
        except json.JSONDecodeError:
            return raw


def _is_high_surrogate(escape: str) -> bool:
    try:
        return 0xD800 <= int(escape[2:], 16) <= 0xDBFF
    except ValueError:
        return False


@dataclass
class PartialCall:
    """A tool call as far as it has been written: its name once whole, and its arguments so far (an
    object's or a list's text, rewritten as json.dumps writes it; a string's waits for the whole parse)."""
    name: str | None = None
    arguments: str = ""
    arguments_key: str | None = None  # "arguments" or Llama's "parameters", whichever came first


ARGUMENT_KEYS = ("arguments", "parameters")


class CallScanner:
    """Reads a reply's tool calls while they are written, from where they begin (calls_begun): each
    JSON object at the top level, or in a top-level list, is a call; its "name" and its arguments are
    read as they come, text outside JSON (markers, `;`) skipped. A call that stops looking like JSON
    ends the scan: the whole reply's parse decides what it was."""

    def __init__(self):
        self.calls: list[PartialCall] = []
        self.outer: list[str] = []  # brackets open outside calls (a top-level list holds calls)
        self.in_call = self.broken = False
        self.expect = "key"  # inside a call: key, colon, value or next (a comma or the call's end)
        self.key: str | None = None
        self.key_text: str | None = None  # a key's string as far as it has been read
        self.value: JsonRewriter | None = None  # the value being read
        self.value_text = ""  # its rewritten text so far

    def feed(self, text: str) -> None:
        for char in text:
            if self.broken:
                return
            if not self.in_call:
                self._outside_char(char)
            elif self.key_text is not None:
                self._key_char(char)
            elif self.value is not None:
                self._value_char(char)
            else:
                self._call_char(char)

    def _outside_char(self, char: str) -> None:
        if char == "{" and self.outer in ([], ["["]):
            self.calls.append(PartialCall())
            self.in_call, self.expect = True, "key"
        elif char in "[{":
            self.outer.append(char)
        elif char in "]}" and self.outer:
            self.outer.pop()

    def _key_char(self, char: str) -> None:
        self.key_text += char
        if char == '"' and (len(self.key_text) - len(self.key_text[:-1].rstrip("\\"))) % 2 == 1:
            self.key, self.key_text, self.expect = json.loads(self.key_text), None, "colon"

    def _call_char(self, char: str) -> None:
        if char in " \t\r\n":
            return
        if self.expect == "key" and char == '"':
            self.key_text = char
        elif self.expect == "colon" and char == ":":
            self.expect = "value"
        elif self.expect == "value":
            self.value, self.value_text = JsonRewriter(), ""
            call = self.calls[-1]
            if self.key in ARGUMENT_KEYS and call.arguments_key is None and char in "{[":
                call.arguments_key = self.key
            self._value_char(char)
        elif self.expect == "next" and char == ",":
            self.expect = "key"
        elif self.expect in ("next", "key") and char == "}":
            self.in_call = False
        else:
            self.broken = True

    def _value_char(self, char: str) -> None:
        value = self.value
        if value.depth == 0 and not value.in_string and char in ",}" and (value.scalar or self.value_text):
            self._add(value.flush())  # a number or literal ends at the delimiter after it
            self._end_value()
            self._call_char(char)
            return
        self._add(value.feed(char))
        if value.done:
            self._end_value()

    def _add(self, piece: str) -> None:
        self.value_text += piece
        if self.key is not None and self.key == self.calls[-1].arguments_key:
            self.calls[-1].arguments += piece

    def _end_value(self) -> None:
        if self.key == "name" and self.value_text.startswith('"'):
            self.calls[-1].name = json.loads(self.value_text)
        self.value, self.expect = None, "next"


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
