"""OpenAI's Responses API (POST /v1/responses) on the chat path: a request becomes a chat completions
request to the same model and template, and the reply becomes a Response object, or its stream of
typed events, as the `openai` client's `responses.create` reads them.

Text in, text out: `input` (a string, or messages whose content is text), `instructions` (a system
message first), `max_output_tokens`, the sampling fields, and `text.format` (JSON or a JSON schema,
as guided decoding). What needs state kept on the server (`previous_response_id`, `background`,
`conversation`) or the model to act (`tools`) is a 400 naming the field; nothing is stored, so every
response reports `store: false`."""

from __future__ import annotations

import itertools
import json
import time
import uuid

from launcher.openai_protocol import APIError

UNSUPPORTED = {
    "previous_response_id": "responses are not stored; send the conversation so far as 'input'",
    "conversation": "conversations are not stored; send the conversation so far as 'input'",
    "background": "send the request and wait for it, or stream it",
    "tools": "send them to /v1/chat/completions (with a model whose chat template takes tools)",
    "prompt": "stored prompts are not kept; send 'instructions' and 'input'",
    "include": "for log-probabilities, use /v1/chat/completions",
    "top_logprobs": "for log-probabilities, use /v1/chat/completions",
    "reasoning": "the models served here answer without a reasoning phase",
}
# Passed on to the chat request as they are (OpenAI's, and vLLM's sampling extras, as its /v1/responses takes them).
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "min_p", "min_tokens", "ignore_eos", "logit_bias")
INPUT_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")


def chat_request(body: dict) -> dict:
    """The chat completions request that answers this Responses request."""
    for name, reason in UNSUPPORTED.items():
        if _given(body.get(name)):
            raise APIError(400, f"'{name}' is not supported on /v1/responses: {reason}", name)
    if body.get("truncation") not in (None, "disabled"):
        raise APIError(400, "'truncation' may only be \"disabled\": a prompt longer than the context is an error",
                       "truncation")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise APIError(400, "'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += input_messages(body.get("input"))
    request = {"messages": messages, **{name: body[name] for name in SAMPLING if name in body}}
    if "model" in body:
        request["model"] = body["model"]
    if body.get("max_output_tokens") is not None:
        request["max_completion_tokens"] = body["max_output_tokens"]
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise APIError(400, "'text' must be an object like {\"format\": {\"type\": \"text\"}}", "text")
        if text.get("format") is not None:
            request["response_format"] = chat_response_format(text["format"])
    return request


def _given(value) -> bool:
    """A field set to something: clients send null, false, [] or {"effort": null} for "none"."""
    if isinstance(value, dict):
        return any(v is not None for v in value.values())
    return value not in (None, False, [], 0)


def input_messages(value) -> list[dict]:
    """`input` as chat messages: a string is the user's message; a list holds messages (or items of type
    "message") whose content is a string or text parts."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a string or a non-empty list of messages", "input")
    messages = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind != "message":
            raise APIError(400, f"input[{i}] must be a message {{role, content}}; items of type {kind!r} are not "
                                "supported here", "input")
        role, content = item.get("role"), item.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") in TEXT_PARTS
                                             and isinstance(part.get("text"), str) for part in content):
            content = "".join(part["text"] for part in content)
        if role not in INPUT_ROLES or not isinstance(content, str):
            raise APIError(400, f"input[{i}] must have a role in {list(INPUT_ROLES)} and content that is a string "
                                f"or a list of text parts ({', '.join(TEXT_PARTS)})", "input")
        messages.append({"role": role, "content": content})
    return messages


def chat_response_format(value) -> dict:
    """`text.format` as chat's `response_format`: the same kinds, the schema's fields one level up."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema" and isinstance(value.get("schema"), dict):
        return {"type": "json_schema", "json_schema": {key: value[key] for key in ("name", "schema", "strict")
                                                       if key in value}}
    raise APIError(400, "'text.format' must be {type: text}, {type: json_object} or {type: json_schema, name, "
                        "schema}", "text.format")


def renamed_error(error: APIError) -> APIError:
    """A chat request's error, naming the Responses request's field it came from."""
    names = {"messages": "input", "prompt": "input", "max_completion_tokens": "max_output_tokens",
             "response_format": "text.format"}
    if error.param not in names:
        return error
    message = error.message.replace("response_format.json_schema", "text.format").replace(
        "'max_completion_tokens'", "'max_output_tokens'").replace("'messages'", "'input'")
    message = "input" + message.removeprefix("prompt") if message.startswith("prompt:") else message
    return APIError(error.status, message, names[error.param], error.kind)


class ModelResponse:
    """One response's object as it goes from in progress to completed (or incomplete: cut by
    max_output_tokens), and its stream's events."""

    def __init__(self, body: dict, model: str):
        self.body, self.model = body, model
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = itertools.count()
        self.text = ""

    def message(self, status: str) -> dict:
        content = [] if status == "in_progress" else [self.part()]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def part(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def object(self, status: str = "in_progress", usage: dict | None = None) -> dict:
        body = self.body
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "metadata": body.get("metadata") or {}, "model": self.model,
                "output": [] if status == "in_progress" else [self.message(status)],
                "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": body.get("temperature", 1.0),
                "text": {"format": text.get("format") or {"type": "text"}},
                "tool_choice": "auto", "tools": [], "top_p": body.get("top_p", 1.0), "truncation": "disabled",
                "usage": usage, "user": body.get("user")}

    def finished(self, text: str, last: dict) -> dict:
        """The whole response from the reply's text and its last event (finish reason, token counts)."""
        self.text = text
        return self.object(self.status(last), self.usage(last))

    @staticmethod
    def status(last: dict) -> str:
        return "incomplete" if last["finish_reason"] == "length" else "completed"

    @staticmethod
    def usage(last: dict) -> dict:
        prompt, completion = last["prompt_tokens"], last["completion_tokens"]
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": last["cached_tokens"]},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion}

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(self.sequence), **fields}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def _at(self) -> dict:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def started(self) -> list[str]:
        """The events before the first text: the response, its message and the message's text part opened."""
        return [self.event("response.created", response=self.object()),
                self.event("response.in_progress", response=self.object()),
                self.event("response.output_item.added", output_index=0, item=self.message("in_progress")),
                self.event("response.content_part.added", **self._at(),
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, text: str) -> str:
        self.text += text
        return self.event("response.output_text.delta", **self._at(), delta=text, logprobs=[])

    def ended(self, last: dict) -> list[str]:
        """The events after the last text: each part closed, then the response completed (or incomplete)."""
        status = self.status(last)
        return [self.event("response.output_text.done", **self._at(), text=self.text, logprobs=[]),
                self.event("response.content_part.done", **self._at(), part=self.part()),
                self.event("response.output_item.done", output_index=0, item=self.message(status)),
                self.event(f"response.{status}", response=self.object(status, self.usage(last)))]
