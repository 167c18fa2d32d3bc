"""OpenAI-compatible request parsing and response shapes for /v1/completions and
/v1/chat/completions. Every bad input becomes an `APIError` carrying the HTTP status and the
offending field, rendered as OpenAI's error object."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

from lm.chat_template import ROLES, ChatTemplate, ChatTemplateError
from lm.engine import MAX_LOGPROBS, SamplingParams
from lm.json_guide import JsonGrammar, SchemaError
from lm.tool_calls import (CallScanner, ToolCall, calls_begun, calls_finish_reason, calls_start, parse_tool_calls,
                           template_tool_calls)

MAX_BODY_BYTES = 1_000_000
MAX_CHOICES = 16  # per request, prompts x `n`: each choice is a sequence in the replica's batch


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise APIError(400, "request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _number(body: dict, name: str, default, kind=(int, float)):
    """body[name] as a number of `kind`; an integer field takes a whole float (16.0), as vLLM's does."""
    value = body.get(name, default)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if kind is int else "a number"
        raise APIError(400, f"'{name}' must be {wanted}, got {type(value).__name__} {repr(value)[:40]}", name)
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {type(value).__name__}", name)
    return value


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's `logit_bias`: {"<token id>": bias}, JSON's keys being strings."""
    value = body.get("logit_bias") or {}
    try:
        bias = {int(key): float(v) for key, v in value.items() if not isinstance(v, bool)}
        if len(bias) == len(value) and all(-100 <= v <= 100 for v in bias.values()):
            return bias
    except (AttributeError, TypeError, ValueError):
        pass
    raise APIError(400, "'logit_bias' must map token ids to numbers between -100 and 100", "logit_bias")


def _id_list(body: dict, name: str) -> list[int]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise APIError(400, f"'{name}' must be a list of token ids", name)
    return value


def sampling_params(body: dict, context: int, chat: ChatTemplate | None = None,
                    defaults: dict | None = None) -> SamplingParams:
    """Completions default to 16 tokens, as OpenAI's do; chat replies (`chat`: the model's template) to
    as many as the context holds (OpenAI's chat default), with `max_completion_tokens` (its newer name)
    before `max_tokens`, and end where the template ends a reply. Besides OpenAI's parameters, vLLM's
    sampling extras: `repetition_penalty`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`, and
    `top_k` as vLLM reads it (0 or -1: off).
    `defaults` (the model's generation_config.json values, as vLLM takes them) stand in for what a
    request leaves out or sends as null."""
    body = {**(defaults or {}), **{key: value for key, value in body.items() if value is not None}}
    length = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, length, None if chat else 16, int)
    temperature = float(_number(body, "temperature", 1.0))
    top_p = float(_number(body, "top_p", 1.0))
    top_k = _number(body, "top_k", None, int)
    if top_k is not None and top_k < -1:
        raise APIError(400, "'top_k' must be at least 1, or 0 or -1 for no top-k", "top_k")
    top_k = None if top_k in (0, -1) else top_k  # vLLM's "off": 0, and -1 (its old default), which clients still send
    seed = _number(body, "seed", None, int)
    penalties = {name: float(_number(body, name, 0.0)) for name in ("presence_penalty", "frequency_penalty")}
    if max_tokens is not None and not 0 < max_tokens < context:
        raise APIError(400, f"'{length}' must be between 1 and {context - 1} (the context is {context})", length)
    # Types here; their ranges (and token ids against the vocabulary) the engine checks, naming the field.
    extras = {"repetition_penalty": float(_number(body, "repetition_penalty", 1.0)),
              "min_p": float(_number(body, "min_p", 0.0)), "min_tokens": _number(body, "min_tokens", 0, int),
              "ignore_eos": _flag(body, "ignore_eos"), "stop_token_ids": _id_list(body, "stop_token_ids"),
              "logit_bias": _logit_bias(body)}
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of non-empty strings", "stop")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop=stop + ([chat.end_of_turn] if chat and chat.end_of_turn else []), seed=seed,
                          **penalties, **extras)


def choice_count(body: dict, prompts: int = 1) -> int:
    n = _number(body, "n", 1, int)
    if not 1 <= n <= MAX_CHOICES // prompts:
        raise APIError(400, f"'n' must be between 1 and {MAX_CHOICES // prompts} (at most {MAX_CHOICES} choices "
                            f"per request, here {prompts} prompts x n)", "n")
    return n


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n samples with seed + i, so that a seeded request is reproducible as a whole and
    its choices still differ (choice 0 is what the same request with n=1 returns)."""
    return params if params.seed is None or index == 0 else replace(params, seed=params.seed + index)


def logprobs_count(body: dict, chat: bool) -> int | None:
    """How many alternatives to report with each token's log-probability, or None for no report:
    completions' `logprobs: k`; chat's `logprobs: true` with `top_logprobs: k`. Completions also take
    `logprobs: true` as 1, as vLLM does (the openai client types the field as an int and Python's True
    is one), and `false` as no report."""
    if not chat:
        count = body.get("logprobs")
        if isinstance(count, bool):
            return 1 if count else None
        count = _number(body, "logprobs", None, int)
        if count is not None and not 0 <= count <= MAX_LOGPROBS:
            raise APIError(400, f"'logprobs' must be between 0 and {MAX_LOGPROBS}", "logprobs")
        return count
    wanted = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", None, int)
    if top is not None and not (wanted and 0 <= top <= MAX_LOGPROBS):
        raise APIError(400, f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}, with 'logprobs': true",
                       "top_logprobs")
    return (top or 0) if wanted else None


def refuse_unsupported(body: dict) -> None:
    """OpenAI parameters this server cannot honour are a 400 naming them, never silently ignored."""
    if body.get("suffix"):
        raise APIError(400, "'suffix' is not supported: the models served here do not fill in the middle",
                       "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise APIError(400, "'best_of' is not supported (beyond best_of = n): send n and choose among the choices",
                       "best_of")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise APIError(400, f"'{legacy}' is not supported: send 'tools' and 'tool_choice'", legacy)
    if body.get("modalities") not in (None, ["text"]) or body.get("audio") is not None:
        raise APIError(400, "only text output is supported: 'modalities' may be [\"text\"], 'audio' null",
                       "audio" if body.get("audio") is not None else "modalities")


def echoes(body: dict) -> bool:
    """Completions' `echo`: the prompt comes back before the completion (and, with logprobs, scored)."""
    return _flag(body, "echo")


def logprobs_object(described: list[dict], chat: bool, offset: int = 0) -> dict:
    """OpenAI's logprobs of a choice (or of a stream chunk) from the replica's described tokens;
    `offset`: where the first token starts in the choice's text (completions' text_offset)."""
    if chat:
        return {"content": [{"token": d["token"], "logprob": d["logprob"], "bytes": list(d["token"].encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in d["top"]]}
                            for d in described]}
    offsets = []
    for d in described:
        offsets.append(offset)
        offset += len(d["token"])
    return {"tokens": [d["token"] for d in described], "token_logprobs": [d["logprob"] for d in described],
            "top_logprobs": [None if d["top"] is None else dict(d["top"]) for d in described], "text_offset": offsets}


def completion_prompts(body: dict) -> list[str | list[int]]:
    """Completions' `prompt`, as OpenAI takes it: a string, a list of token ids, or a list of either
    (each prompt gets its own `n` choices)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        if len(prompt) > MAX_CHOICES:
            raise APIError(400, f"'prompt' holds {len(prompt)} prompts; at most {MAX_CHOICES} per request", "prompt")
        return prompt
    raise APIError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt")


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in value)


def chat_prompt(body: dict, template: ChatTemplate, add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    try:
        return template.render([_chat_message(i, m, template.takes_tools) for i, m in enumerate(messages)],
                               add_generation_prompt, tools)
    except ChatTemplateError as error:  # e.g. a model's template that wants user and assistant to alternate
        raise APIError(400, f"'messages': {error}", "messages") from None


def _chat_message(i: int, message, takes_tools: bool) -> dict:
    """One message as the template takes it. OpenAI's newer forms are accepted: content as a list of
    text parts ([{"type": "text", "text": ...}], joined), and the "developer" role (its name for system).
    With a template that takes tools, also the turns of a tool call: an assistant's `tool_calls`
    (content may be null; JSON `arguments` handed to the template as an object, as vLLM does) and the
    "tool" role's results."""
    role = message.get("role") if isinstance(message, dict) else None
    role = "system" if role == "developer" else role
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        content = "".join(part["text"] for part in content)
    roles = [*ROLES, "tool"] if takes_tools else list(ROLES)
    if takes_tools and role == "assistant" and message.get("tool_calls"):
        try:
            calls = template_tool_calls(message["tool_calls"])
        except ValueError as error:
            raise APIError(400, f"messages[{i}].{error}", "messages") from None
        return {"role": role, "content": content if isinstance(content, str) else "", "tool_calls": calls}
    if role not in roles or not isinstance(content, str):
        raise APIError(400, f"messages[{i}] must be an object with role in {roles} (or developer) and string "
                            "content (or a list of text parts)", "messages")
    if role == "tool":
        return {"role": role, "content": content, "tool_call_id": message.get("tool_call_id")}
    return {"role": role, "content": content}


def chat_tools(body: dict, template: ChatTemplate) -> list[dict] | None:
    """OpenAI's `tools` (function tools) with `tool_choice`: the tools the prompt offers the model, or
    None. "auto" (the default) offers them and reads calls out of the reply; "none" offers none, as
    vLLM does; "required" and a named function offer them and force a call (`forced_tool_call`). A
    model whose template takes no tools cannot be offered any."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise APIError(400, "'tools' must be a list of {type: function, function: {name, description, parameters}}",
                       "tools")
    names = [t["function"]["name"] for t in tools]
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if choice not in (None, "auto", "none", "required") and named not in names:
        raise APIError(400, "'tool_choice' must be 'auto', 'none', 'required' or {type: function, function: {name}} "
                            f"naming one of the tools ({', '.join(names)})", "tool_choice")
    if choice == "none":
        return None
    if not template.takes_tools:
        raise APIError(400, "'tools': this model's chat template does not take tools; send the request without "
                            "them", "tools")
    return tools


def forced_tool_call(body: dict, tools: list[dict] | None) -> tuple[JsonGrammar, str] | None:
    """A forced call's grammar and how its reply is read (lm.tool_calls' "required" or "named"), or None.
    As vLLM does, the reply is guided to a JSON list of {"name", "parameters"} objects, each matching
    its tool's parameter schema: "required" allows one or more calls of any of the tools, a named
    function exactly one call of it. Its `finish_reason` is "tool_calls" for "required" and "stop" for
    a named function, as OpenAI's and vLLM's are."""
    choice = body.get("tool_choice")
    if not tools or choice in (None, "auto", "none"):
        return None
    chosen = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    parallel = parallel_tool_calls(body)
    parameters = [tool["function"].get("parameters") or {"type": "object", "properties": {}} for tool in chosen]
    calls = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]}, "parameters": schema},
              "required": ["name", "parameters"]} for tool, schema in zip(chosen, parameters)]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if choice != "required" or not parallel:
        schema["maxItems"] = 1
    try:
        return JsonGrammar(schema), "required" if choice == "required" else "named"
    except SchemaError:  # name the tool whose parameters cannot be enforced
        for tool, schema in zip(chosen, parameters):
            _grammar(schema, f"tools[{tools.index(tool)}].function.parameters", "tools")
        raise


def response_format(body: dict) -> JsonGrammar | None:
    """OpenAI's `response_format`, as guided decoding: {"type": "text"} (the default) leaves the reply
    free; {"type": "json_object"} makes it one JSON object; {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}} JSON matching the schema (lm.json_guide lists what it enforces)."""
    value = body.get("response_format")
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return JsonGrammar(None)
    spec = value.get("json_schema") if kind == "json_schema" else None
    if not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
        raise APIError(400, "'response_format' must be {type: text}, {type: json_object} or {type: json_schema, "
                            "json_schema: {name, schema}}", "response_format")
    return _grammar(spec["schema"], "response_format.json_schema.schema", "response_format")


def _grammar(schema, where: str, param: str, build=JsonGrammar) -> JsonGrammar:
    """A request's schema (or regex, or grammar: `build`) compiled, or a 400 naming where in it (`where`:
    its place in the body)."""
    try:
        return build(schema)
    except SchemaError as error:
        raise APIError(400, f"{where}.{error}" if error.path else f"{where}: {error}", param) from None


STRUCTURED_OUTPUTS = ("json", "json_object", "choice", "regex", "grammar")


def structured_outputs(body: dict) -> JsonGrammar | None:
    """vLLM's `structured_outputs` (extra_body in the openai client): {"json": schema}, {"json_object":
    true}, {"choice": [strings]} (the reply is one of them, as written), {"regex": pattern} (text the
    pattern matches whole), or {"grammar": GBNF rules} (text the grammar matches, from its `root`)."""
    value = body.get("structured_outputs")
    if value is None:
        return None
    chosen = [key for key, v in value.items() if v not in (None, False)] if isinstance(value, dict) else []
    if len(chosen) != 1:
        raise APIError(400, f"'structured_outputs' must be an object with one of {', '.join(STRUCTURED_OUTPUTS)}",
                       "structured_outputs")
    if chosen[0] not in STRUCTURED_OUTPUTS:
        raise APIError(400, f"'structured_outputs.{chosen[0]}' is not supported; supported: "
                            f"{', '.join(STRUCTURED_OUTPUTS)}", "structured_outputs")
    key, spec = chosen[0], value[chosen[0]]
    if key == "json_object":
        return JsonGrammar(None)
    if key == "choice":
        if not (isinstance(spec, list) and spec and all(isinstance(c, str) and c for c in spec)):
            raise APIError(400, "'structured_outputs.choice' must be a non-empty list of non-empty strings",
                           "structured_outputs")
        return JsonGrammar.choice(spec)
    if key in ("regex", "grammar"):
        if not isinstance(spec, str):
            raise APIError(400, f"'structured_outputs.{key}' must be a string", "structured_outputs")
        build = JsonGrammar.regex if key == "regex" else JsonGrammar.ebnf
        return _grammar(spec, f"structured_outputs.{key}", "structured_outputs", build)
    if isinstance(spec, str):  # vLLM takes the schema as JSON text too
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            spec = None
    return _grammar(spec if isinstance(spec, dict) else [], "structured_outputs.json", "structured_outputs")


def guided_decoding(body: dict, tools: list[dict] | None) -> tuple[JsonGrammar | None, str | None]:
    """(the grammar a request's reply follows, or None; a forced call's reply form, or None). One of
    `response_format`, vLLM's `structured_outputs` and a forced `tool_choice` per request."""
    given = [(name, grammar) for name, grammar in (("response_format", response_format(body)),
                                                   ("structured_outputs", structured_outputs(body))) if grammar]
    forced = forced_tool_call(body, tools)
    if len(given) + bool(forced) > 1:
        raise APIError(400, "send one of 'response_format', 'structured_outputs' and a forced 'tool_choice'",
                       given[-1][0])
    return (forced[0], forced[1]) if forced else (given[0][1] if given else None, None)


def parallel_tool_calls(body: dict) -> bool:
    """OpenAI's `parallel_tool_calls` (true by default): false allows one call a reply. A forced call is
    guided to one; otherwise the reply's first call is the one returned, as vLLM does."""
    return _flag(body, "parallel_tool_calls", True)


def read_tool_calls(text: str, form: str, parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """The reply's text before its calls (None if none) and its calls, the first only unless parallel."""
    content, calls = parse_tool_calls(text, form)
    return content, calls if parallel else calls[:1]


class ToolCallStream:
    """A streamed chat choice when tools are offered. Text goes out as it comes, up to where the model
    begins a tool call (or may be beginning one); the calls then go out as OpenAI streams them, while
    the model writes them: a call's id and name once its name is whole, then its arguments in pieces
    (lm.tool_calls.CallScanner), which add up to the arguments the whole reply's parse returns."""

    def __init__(self, form: str, parallel: bool = True):
        self.form, self.parallel, self.text, self.sent = form, parallel, "", 0
        self.scanner: CallScanner | None = None  # reads the calls from where they begin
        self.streamed: list[int] = []  # each streamed call's arguments sent, in characters

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(the text that can be sent now, tool-call deltas as OpenAI's `delta.tool_calls` carries them)."""
        self.text += delta
        start = calls_start(self.text, self.form)
        safe = len(self.text) if start is None else start
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        if self.scanner is None:
            begun = calls_begun(self.text, self.form)
            if begun is None:
                return out, []
            self.scanner, delta = CallScanner(), self.text[begun:]
        self.scanner.feed(delta)
        return out, self._call_deltas()

    def _call_deltas(self) -> list[dict]:
        deltas = []
        for index, call in enumerate(self.scanner.calls[:None if self.parallel else 1]):
            if index == len(self.streamed):
                if call.name is None:
                    break
                self.streamed.append(0)
                deltas.append(ToolCall(call.name, "").openai(index))
            if len(call.arguments) > self.streamed[index]:
                piece = call.arguments[self.streamed[index]:]
                self.streamed[index] = len(call.arguments)
                if deltas and deltas[-1]["index"] == index:
                    deltas[-1]["function"]["arguments"] += piece
                else:
                    deltas.append({"index": index, "function": {"arguments": piece}})
        return deltas

    def finish(self) -> tuple[str, list[dict], bool]:
        """(text still to send, the last tool-call deltas, whether the reply made calls). A reply whose
        calls began streaming stays calls, as OpenAI's and vLLM's do, even if the whole does not parse."""
        _, calls = read_tool_calls(self.text, self.form, self.parallel)
        if not self.streamed:
            return ("", [call.openai(i) for i, call in enumerate(calls)], True) if calls else \
                (self.text[self.sent:], [], False)
        deltas = []
        for index, call in enumerate(calls):
            if index >= len(self.streamed):
                deltas.append(call.openai(index))
                continue
            sent = self.scanner.calls[index].arguments[:self.streamed[index]]
            if call.arguments.startswith(sent) and len(call.arguments) > len(sent):  # e.g. a string's text
                deltas.append({"index": index, "function": {"arguments": call.arguments[len(sent):]}})
        return "", deltas, bool(calls)


def tokenize_text(body: dict, template: ChatTemplate) -> tuple[str, bool]:
    """/tokenize's text: vLLM's `prompt`, or `messages` rendered with the chat template; and whether
    the tokenizer's special tokens are added to it (`adds_special_tokens`)."""
    if "messages" in body:
        text = chat_prompt(body, template, _flag(body, "add_generation_prompt", True), chat_tools(body, template))
        return text, adds_special_tokens(body, True)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (or send 'messages')", "prompt")
    return prompt, adds_special_tokens(body, False)


def adds_special_tokens(body: dict, chat: bool) -> bool:
    """vLLM's `add_special_tokens`: a completion's text prompt is encoded as `tokenizer(prompt)` is (a
    Llama tokenizer's BOS first); a chat prompt is not, its template having written them."""
    return _flag(body, "add_special_tokens", not chat)


def check_model(body: dict, model_name: str) -> None:
    name = body.get("model", model_name)
    if name != model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: the prompt tokens the prefix cache held (not prefilled)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(model: str, choices: list[tuple[str, str, int, dict | None]], prompt_tokens: int,
                        chat: bool, tool_form: str | None = None, parallel_calls: bool = True,
                        cached_tokens: int = 0) -> dict:
    """`choices`: (text, finish_reason, completion tokens, logprobs object or None) of each; `tool_form`:
    how the model writes tool calls, when the request offered tools (lm.tool_calls); `parallel_calls`:
    the request's parallel_tool_calls; `cached_tokens`: prompt tokens found in the prefix cache."""
    rendered = []
    for index, (text, finish_reason, _, logprobs) in enumerate(choices):
        choice = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs}
        if chat:
            content, calls = read_tool_calls(text, tool_form, parallel_calls) if tool_form else (text, [])
            choice["message"] = {"role": "assistant", "content": content}
            if calls:
                choice["message"]["tool_calls"] = [call.openai() for call in calls]
                choice["finish_reason"] = calls_finish_reason(tool_form, finish_reason)
        else:
            choice["text"] = text
        rendered.append(choice)
    completion_tokens = sum(choice[2] for choice in choices)
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": rendered,
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def wants_stream_usage(body: dict) -> bool:
    """OpenAI's `stream_options: {"include_usage": true}`: a last chunk carrying the token counts."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return options.get("include_usage", False)


def usage_chunk(chunk_id: str, model: str, prompt_tokens: int, completion_tokens: int, chat: bool,
                cached_tokens: int = 0) -> str:
    body = {"id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}
    return f"data: {json.dumps(body)}\n\n"


def tool_calls_chunk(chunk_id: str, model: str, deltas: list[dict], index: int = 0) -> str:
    """A streamed choice's tool-call deltas (ToolCallStream's): a client accumulates each call's pieces
    by their `index`."""
    choice = {"index": index, "delta": {"tool_calls": deltas}, "finish_reason": None}
    body = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


def stream_chunk(chunk_id: str, model: str, delta: str | None, finish_reason: str | None, chat: bool,
                 first: bool = False, index: int = 0, logprobs: dict | None = None) -> str:
    if chat:
        payload = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
        choice = {"index": index, "delta": payload, "finish_reason": finish_reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs
    else:
        choice = {"index": index, "text": delta or "", "finish_reason": finish_reason, "logprobs": logprobs}
    body = {"id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"
