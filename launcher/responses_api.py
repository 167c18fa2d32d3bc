"""OpenAI's Responses API (POST /v1/responses) on the chat path: a request becomes a chat completions
request to the same model and template, and the reply becomes a Response object, or its stream of
typed events, as the `openai` client's `responses.create` reads them.

`input` (a string, or messages whose content is text, and the function calls and their outputs of a
tool-using conversation), `instructions` (a system message first), `max_output_tokens`, the sampling
fields, `text.format` (JSON or a JSON schema, as guided decoding), the text's log-probabilities
(`include: ["message.output_text.logprobs"]`, `top_logprobs`), and function `tools` with
`tool_choice`, for a model whose chat template takes tools: its calls come back as `function_call`
items. What needs state kept on the server (`previous_response_id`, `background`, `conversation`) is
a 400 naming the field; nothing is stored, so every response reports `store: false`."""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid

from launcher.openai_protocol import APIError

UNSUPPORTED = {
    "previous_response_id": "responses are not stored; send the conversation so far as 'input'",
    "conversation": "conversations are not stored; send the conversation so far as 'input'",
    "background": "send the request and wait for it, or stream it",
    "prompt": "stored prompts are not kept; send 'instructions' and 'input'",
    "reasoning": "the models served here answer without a reasoning phase",
}
# Passed on to the chat request as they are (OpenAI's, and vLLM's sampling extras, as its /v1/responses takes them).
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "min_p", "min_tokens", "ignore_eos", "logit_bias")
INPUT_ROLES = ("user", "assistant", "system", "developer")
LOGPROBS = "message.output_text.logprobs"  # `include`'s item that asks for the text's log-probabilities
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
    if _given(body.get("tools")):
        request["tools"] = function_tools(body["tools"])
    if body.get("tool_choice") is not None:
        request["tool_choice"] = chat_tool_choice(body["tool_choice"])
    if "parallel_tool_calls" in body:
        request["parallel_tool_calls"] = body["parallel_tool_calls"]
    include = body.get("include") or []
    if not (isinstance(include, list) and all(isinstance(item, str) for item in include)):
        raise APIError(400, "'include' must be a list of strings such as \"message.output_text.logprobs\"", "include")
    if LOGPROBS in include or _given(body.get("top_logprobs")):  # what else may be included, these replies lack
        request["logprobs"], request["top_logprobs"] = True, body.get("top_logprobs") or 0
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
    "message", as a response's output comes back) whose content is a string or text parts, and a
    tool-using conversation's function calls (joined to their assistant turn) and outputs."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a string or a non-empty list of messages", "input")
    messages = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            call = _function_call(i, item)
            if messages and messages[-1]["role"] == "assistant":  # the same turn's text, or its other calls
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            if not (isinstance(item.get("call_id"), str) and isinstance(item.get("output"), str)):
                raise APIError(400, f"input[{i}]: a function_call_output needs a call_id and a string output",
                               "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            continue
        if kind != "message":
            raise APIError(400, f"input[{i}] must be a message {{role, content}}, a function_call or a "
                                f"function_call_output; items of type {kind!r} are not supported here", "input")
        role, content = item.get("role"), item.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") in TEXT_PARTS
                                             and isinstance(part.get("text"), str) for part in content):
            content = "".join(part["text"] for part in content)
        if role not in INPUT_ROLES or not isinstance(content, str):
            raise APIError(400, f"input[{i}] must have a role in {list(INPUT_ROLES)} and content that is a string "
                                f"or a list of text parts ({', '.join(TEXT_PARTS)})", "input")
        messages.append({"role": role, "content": content})
    return messages


def _function_call(i: int, item: dict) -> dict:
    """An earlier reply's function call, as chat's assistant `tool_calls` carry it."""
    if not all(isinstance(item.get(key), str) for key in ("call_id", "name", "arguments")):
        raise APIError(400, f"input[{i}]: a function_call needs a call_id, a name and arguments (a JSON string)",
                       "input")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def function_tools(tools) -> list[dict]:
    """Function tools ({type: function, name, description, parameters}) as chat's, the function's
    fields one level down."""
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list of function tools {type: function, name, parameters}", "tools")
    converted = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools[{i}] must be a function tool {{type: function, name, parameters}}; tools "
                                f"of type {kind!r} are not supported here", "tools")
        converted.append({"type": "function", "function": {key: tool[key] for key in
                                                            ("name", "description", "parameters", "strict")
                                                            if tool.get(key) is not None}})
    return converted


def chat_tool_choice(value):
    """"auto", "none", "required", or {type: function, name} as chat's {type: function, function: {name}}."""
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    return value  # chat's check names what is wrong with anything else


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
             "response_format": "text.format", "tools": "tools", "tool_choice": "tool_choice",
             "top_logprobs": "top_logprobs"}
    if error.param not in names:
        return error
    message = error.message.replace("response_format.json_schema", "text.format").replace(
        "'max_completion_tokens'", "'max_output_tokens'").replace("'messages'", "'input'")
    message = message.replace(", with 'logprobs': true", "")
    message = re.sub(r"(tools\[\d+\])\.function\.", r"\1.", message).replace("{type: function, function: {name}}",
                                                                           "{type: function, name}")
    message = "input" + message.removeprefix("prompt") if message.startswith("prompt:") else message
    return APIError(error.status, message, names[error.param], error.kind)


class ModelResponse:
    """One response's object as it goes from in progress to completed (or incomplete: cut by
    max_output_tokens), and its stream's events. Its output: a message with the reply's text (left out
    when the reply is only function calls), then a function_call item per call."""

    def __init__(self, body: dict, model: str):
        self.body, self.model = body, model
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = itertools.count()
        self.text, self.calls, self.message_open = "", [], False
        self.logprobs: list[dict] = []  # the text's tokens' (with `include` or `top_logprobs`), chat's form

    def message(self, status: str) -> dict:
        content = [] if status == "in_progress" else [self.part()]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def part(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}

    @staticmethod
    def call_item(call: dict, status: str = "completed") -> dict:
        """A function call (ToolCall.openai()'s dict) as an output item; its call_id is what the function's
        output names when the conversation goes on."""
        return {"type": "function_call", "id": f"fc_{call['id'].removeprefix('call_')}", "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"] if status == "completed" else "", "status": status}

    def output(self, status: str) -> list[dict]:
        calls = [self.call_item(call) for call in self.calls]
        return calls if calls and not self.text else [self.message(status), *calls]

    def object(self, status: str = "in_progress", usage: dict | None = None) -> dict:
        body = self.body
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        cut = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": cut,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "metadata": body.get("metadata") or {}, "model": self.model,
                "output": [] if status == "in_progress" else self.output(status),
                "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": body.get("temperature", 1.0),
                "text": {"format": text.get("format") or {"type": "text"}},
                "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
                "top_logprobs": body.get("top_logprobs"), "top_p": body.get("top_p", 1.0), "truncation": "disabled",
                "usage": usage, "user": body.get("user")}

    def finished(self, text: str | None, calls: list[dict], last: dict, logprobs: list[dict]) -> dict:
        """The whole response from the reply's text, its calls, its last event (finish reason, token counts)
        and its tokens' log-probabilities."""
        self.text, self.calls, self.logprobs = text or "", calls, logprobs
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
        return [self.event("response.created", response=self.object()),
                self.event("response.in_progress", response=self.object())]

    def _open_message(self) -> list[str]:
        self.message_open = True
        return [self.event("response.output_item.added", output_index=0, item=self.message("in_progress")),
                self.event("response.content_part.added", **self._at(),
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, text: str, logprobs: list[dict] = ()) -> list[str]:
        """The message's next text and its tokens' log-probabilities (the message opened by its first)."""
        opened = [] if self.message_open else self._open_message()
        self.text += text
        self.logprobs += logprobs
        return opened + [self.event("response.output_text.delta", **self._at(), delta=text, logprobs=list(logprobs))]

    def ended(self, last: dict, calls: list[dict]) -> list[str]:
        """The events after the last text: the message closed (a reply of calls alone has none), each call
        as an item with its arguments, then the response completed (or incomplete)."""
        status, self.calls = self.status(last), calls
        events = [] if self.message_open or calls else self._open_message()
        if self.message_open:
            events += [self.event("response.output_text.done", **self._at(), text=self.text, logprobs=self.logprobs),
                       self.event("response.content_part.done", **self._at(), part=self.part()),
                       self.event("response.output_item.done", output_index=0, item=self.message(status))]
        for index, call in enumerate(calls, start=int(self.message_open)):
            item = self.call_item(call)
            at = {"item_id": item["id"], "output_index": index}
            events += [self.event("response.output_item.added", output_index=index,
                                  item=self.call_item(call, "in_progress")),
                       self.event("response.function_call_arguments.delta", **at, delta=item["arguments"]),
                       self.event("response.function_call_arguments.done", **at, name=item["name"],
                                  arguments=item["arguments"]),
                       self.event("response.output_item.done", output_index=index, item=item)]
        return events + [self.event(f"response.{status}", response=self.object(status, self.usage(last)))]
