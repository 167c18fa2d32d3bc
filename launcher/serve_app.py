"""The Ray Serve application: an OpenAI-compatible ingress in front of the model deployment
(launcher.serve_model, which wraps lm.engine). Separate from training; `serve run cluster/serve.yaml`
or `make serve` start it.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation
# through Serve's ingress wrapper, or it takes `request` for a required query parameter (422).
import asyncio
import hmac
import os
import uuid
from dataclasses import replace
from pathlib import Path, PurePosixPath

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.requests import ClientDisconnect

from launcher.openai_protocol import (APIError, ToolCallStream, adds_special_tokens, chat_prompt, chat_tools,
                                      check_model, choice_count, choice_params, completion_prompts,
                                      completion_response, echoes, guided_decoding, logprobs_count, logprobs_object,
                                      parallel_tool_calls, parse_body, read_tool_calls, refuse_unsupported,
                                      sampling_params, stream_chunk, tokenize_text, tool_calls_chunk, usage_chunk,
                                      wants_stream_usage)
from launcher.prefix_router import PrefixAffinityRouter
from launcher.responses_api import ModelResponse, chat_request, renamed_error
from launcher.serve_model import SHUTDOWN_CHECK_S, LanguageModel
from lm.chat_template import BUILTIN, ChatTemplate
from lm.tool_calls import calls_finish_reason

api = FastAPI(title="lmstack OpenAI-compatible API")


@api.exception_handler(APIError)
async def api_error(request: Request, error: APIError) -> JSONResponse:
    """Every bad request, wherever a route finds it: its status and OpenAI's error object."""
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(ClientDisconnect)
async def client_gone(request: Request, error: ClientDisconnect) -> Response:
    """A client that went away before its request's body arrived: nginx's 499 (client closed request),
    as Serve's proxy answers when it notices first; from a route the error was a 500 in Serve's metrics,
    with a traceback (seen in a stress run of abandoned requests)."""
    return Response(status_code=499)


class RequestsInFlight:
    """ASGI middleware: counts HTTP requests until their response has gone out (a stream's last event
    included), and once the server drains (launcher.serve's Ctrl-C or SIGTERM) answers new ones, /health
    too, with a 503, so a load balancer stops sending them while those in flight finish."""

    count = 0
    draining = False

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if RequestsInFlight.draining:
            error = APIError(503, "the server is shutting down", None, "service_unavailable")
            return await JSONResponse(error.body(), status_code=503)(scope, receive, send)
        RequestsInFlight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            RequestsInFlight.count -= 1


api.add_middleware(RequestsInFlight)


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, model, model_name: str, api_key: str | None):
        self.model, self.model_name, self.api_key = model, model_name, api_key
        self.model_info: dict | None = None
        self.chat_template = None
        self.vocab_size: int | None = None

    def _authorize(self, request: Request) -> None:
        sent = request.headers.get("authorization", "").encode()
        # Compared in constant time, so response timing does not reveal how much of a guess was right.
        if self.api_key and not hmac.compare_digest(sent, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "authentication_error")

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    def drain(self) -> int:
        """From now on new requests get a 503; the number still in flight (called through a handle)."""
        RequestsInFlight.draining = True
        return RequestsInFlight.count

    def requests_in_flight(self) -> int:
        return RequestsInFlight.count

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [await self._model_object()]}

    @api.get("/v1/models/{model}")
    async def retrieve_model(self, model: str, request: Request):
        self._authorize(request)
        check_model({"model": model}, self.model_name)
        return await self._model_object()

    async def _model_object(self) -> dict:
        """OpenAI's model object (created: when the export was written), with vLLM's max_model_len (the
        tokens a sequence may hold)."""
        max_model_len = await self._context()
        return {"id": self.model_name, "object": "model", "created": self.model_info["created"],
                "owned_by": "lmstack", "max_model_len": max_model_len}

    async def _context(self) -> int:
        """The replicas' context (serve.max_model_len, or the model's), asked once."""
        if self.model_info is None:
            self.model_info = await self.model.info.remote()
        return self.model_info["context"]

    async def _chat_template(self) -> ChatTemplate:
        """The model's chat template (the one it was fine-tuned with), asked once."""
        if self.chat_template is None:
            await self._context()
            saved = self.model_info["chat_template"]
            self.chat_template = BUILTIN if saved is None else ChatTemplate.from_json(saved)
        return self.chat_template

    # vLLM's tokenizer endpoints, which lm-evaluation-harness's local-completions model looks for: with
    # them it tokenizes on the server and needs no local copy of the tokenizer.
    @api.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request):
        self._authorize(request)
        return await self.model.tokenizer_info.remote()

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        self._authorize(request)
        text, add_special_tokens = tokenize_text(parse_body(await request.body()), await self._chat_template())
        try:
            tokens = await self.model.tokenize.remote(text, add_special_tokens)
        except ValueError as error:  # a character outside a character-level vocabulary
            raise APIError(400, f"prompt: {error}", "prompt") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": await self._context()}

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        self._authorize(request)
        tokens = parse_body(await request.body()).get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
            raise APIError(400, "'tokens' must be a list of token ids", "tokens")
        if self.vocab_size is None:
            self.vocab_size = (await self.model.tokenizer_info.remote())["vocab_size"]
        if not all(0 <= t < self.vocab_size for t in tokens):
            raise APIError(400, f"'tokens' must be between 0 and {self.vocab_size - 1}", "tokens")
        return {"prompt": await self.model.detokenize.remote(tokens)}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    @api.post("/v1/responses")
    async def responses(self, request: Request):
        """OpenAI's Responses API, answered on the chat path (launcher.responses_api)."""
        self._authorize(request)
        body = parse_body(await request.body())
        try:
            choices, _, tool_form, parallel = await self._start(chat_request(body), chat=True)
        except APIError as error:
            raise renamed_error(error) from None
        response = ModelResponse(body, self.model_name)
        if body.get("stream"):
            return StreamingResponse(self._response_events(response, choices[0], tool_form, parallel),
                                     media_type="text/event-stream")
        text, last, described = await self._collect(choices[0])
        content, calls = read_tool_calls(text, tool_form, parallel) if tool_form else (text, [])
        return response.finished(content, [call.openai() for call in calls], last,
                                 logprobs_object(described, chat=True)["content"])

    @staticmethod
    async def _response_events(response: ModelResponse, events, tool_form: str | None, parallel: bool):
        """The reply's text as it comes (with tools offered, up to where a call may begin, and without
        log-probabilities), its calls once it is whole."""
        calls_held = ToolCallStream(tool_form, parallel) if tool_form else None
        for event in response.started():
            yield event
        async for event in events:
            text, logprobs = event.get("delta", ""), logprobs_object(event.get("logprobs", []), chat=True)["content"]
            if calls_held is not None:
                text, logprobs = calls_held.feed(text)[0] if text else "", []
            for sent in response.delta(text, logprobs) if text or logprobs else []:
                yield sent
            if "finish_reason" in event:
                calls = []
                if calls_held is not None:
                    rest, _, _ = calls_held.finish()
                    for sent in response.delta(rest) if rest else []:
                        yield sent
                    calls = [call.openai() for call in read_tool_calls(calls_held.text, tool_form, parallel)[1]]
                for sent in response.ended(event, calls):
                    yield sent

    async def _complete(self, request: Request, chat: bool):
        self._authorize(request)
        body = parse_body(await request.body())
        usage = bool(body.get("stream")) and wants_stream_usage(body)
        choices, n, tool_form, parallel = await self._start(body, chat)
        if body.get("stream"):
            return StreamingResponse(self._sse(choices, n, chat, usage, tool_form, parallel),
                                     media_type="text/event-stream")
        finished = await asyncio.gather(*(self._collect(events) for events in choices))
        scored = logprobs_count(body, chat) is not None
        return completion_response(
            self.model_name,
            [(text, last["finish_reason"], last["completion_tokens"],
              logprobs_object(described, chat) if scored else None) for text, last, described in finished],
            sum(last["prompt_tokens"] for _, last, _ in finished[::n]), chat, tool_form, parallel,  # each prompt once
            sum(last["cached_tokens"] for _, last, _ in finished[::n]))

    async def _start(self, body: dict, chat: bool) -> tuple[list, int, str | None, bool]:
        """A request's sequences submitted to the model replicas, once it is checked: each choice's
        events (its first already read, so that a bad request is a 4xx before any response starts), n,
        how replies write tool calls (None: no tools offered), and whether calls may be parallel."""
        check_model(body, self.model_name)
        refuse_unsupported(body)
        template = await self._chat_template() if chat else None
        tools = chat_tools(body, template) if chat else None
        grammar, forced = guided_decoding(body, tools)
        tool_form = forced or (template.tool_format if tools else None)  # replies are read for tool calls
        parallel = parallel_tool_calls(body)
        prompts = [chat_prompt(body, template, tools=tools)] if chat else completion_prompts(body)
        context = await self._context()
        params = replace(sampling_params(body, context, template, self.model_info["sampling_defaults"]),
                         logprobs=logprobs_count(body, chat), grammar=grammar)
        echo = not chat and echoes(body)
        add_special_tokens = adds_special_tokens(body, chat)
        n = choice_count(body, len(prompts))
        # One sequence per choice, n per prompt (choice index = prompt index x n + i), all decoded
        # in the same batch.
        choices = [self.model.options(stream=True).generate.remote(prompt, choice_params(params, i), echo,
                                                                   add_special_tokens)
                   .__aiter__() for prompt in prompts for i in range(n)]
        firsts = [await events.__anext__() for events in choices]
        for first in firsts:
            if "error" in first:
                raise APIError(400, first["error"], first["param"])
        return [self._chain(first, events) for first, events in zip(firsts, choices)], n, tool_form, parallel

    @staticmethod
    async def _chain(first, rest):
        """The first event (already read, to turn errors into 4xx) followed by the rest."""
        yield first
        async for event in rest:
            yield event

    @staticmethod
    async def _collect(events) -> tuple:
        """A choice's whole text, its last event (finish reason, token counts) and its described tokens."""
        text, described = "", []
        async for event in events:
            text += event.get("delta", "")
            described += event.get("logprobs", [])
            last = event
        return text, last, described

    @staticmethod
    async def _merged(choices):
        """(index, event) from every choice's events, in the order they arrive."""
        if len(choices) == 1:
            async for event in choices[0]:
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, events):
            try:
                async for event in events:
                    await queue.put((index, event))
                await queue.put((index, None))  # this choice is done
            except Exception as error:  # a failed decode step: the response fails, as with one choice
                await queue.put((index, error))

        tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(choices)]
        try:
            done = 0
            while done < len(choices):
                index, event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                if event is None:
                    done += 1
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()

    async def _sse(self, choices, n: int, chat: bool, usage: bool, tool_form: str | None = None,
                   parallel: bool = True):
        chunk_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        opened, prompt_tokens, completion_tokens, cached_tokens = set(), 0, 0, 0
        offsets = {}  # completions' text_offset: where each choice's next token starts
        tool_streams = {}  # with tools offered: each choice's text, held back where a tool call may begin
        async for index, event in self._merged(choices):
            if "delta" in event:
                logprobs = None
                if "logprobs" in event:
                    logprobs = logprobs_object(event["logprobs"], chat, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(d["token"]) for d in event["logprobs"])
                delta, call_deltas = event["delta"], []
                if tool_form:
                    delta, call_deltas = tool_streams.setdefault(index, ToolCallStream(tool_form, parallel)).feed(delta)
                if delta or logprobs is not None or index not in opened:
                    yield stream_chunk(chunk_id, self.model_name, delta, None, chat, index not in opened, index,
                                       logprobs)
                    opened.add(index)
                if call_deltas:
                    yield tool_calls_chunk(chunk_id, self.model_name, call_deltas, index)
            else:
                if chat and index not in opened:
                    yield stream_chunk(chunk_id, self.model_name, "", None, chat, True, index)
                finish_reason = event["finish_reason"]
                if index in tool_streams:
                    rest, call_deltas, called = tool_streams[index].finish()
                    if rest:
                        yield stream_chunk(chunk_id, self.model_name, rest, None, chat, index=index)
                    if call_deltas:
                        yield tool_calls_chunk(chunk_id, self.model_name, call_deltas, index)
                    if called:
                        finish_reason = calls_finish_reason(tool_form, finish_reason)
                yield stream_chunk(chunk_id, self.model_name, None, finish_reason, chat, index=index)
                if index % n == 0:  # each prompt counts once
                    prompt_tokens += event["prompt_tokens"]
                    cached_tokens += event["cached_tokens"]
                completion_tokens += event["completion_tokens"]
        if usage:
            yield usage_chunk(chunk_id, self.model_name, prompt_tokens, completion_tokens, chat, cached_tokens)
        yield "data: [DONE]\n\n"


def newest_export(storage: str, run_name: str | None) -> str:
    """The newest export of the named run, or the newest of any run, under run.storage (a path or a URI)."""
    from launcher.run_dir import RunDir

    if run_name and not RunDir(storage, run_name).exists():
        raise FileNotFoundError(f"run.name={run_name!r} has no run directory under run.storage={storage!r}")
    names = [run_name] if run_name else RunDir(storage, "").listdir()
    exports = [e for name in names for e in RunDir(storage, name).exports()]
    if not exports:
        where = RunDir(storage, run_name).where("exports") if run_name else storage
        raise FileNotFoundError(f"no export under {where}: train, then run `python -m launcher.export "
                                f"run.name={run_name or '<run>'}`")
    return max(exports)[1]


def served_model(export_dir: str) -> tuple[str, int | None]:
    """(the model's name in the API, its context) for what serve.export_dir names: an export, named for
    its run (<storage>/<run>/exports/<export>), or a Hugging Face model directory, named for itself and
    served as it is (fp32), as `vllm serve <dir>` would. Checked here, where a bad directory is one line,
    when it is on this machine; the context is None for one in an object store (a replica reads it)."""
    from lm.config import ConfigError
    from lm.pretrained import FIELD, inspect_pretrained
    from lm.remote_files import is_uri, split_query

    path = PurePosixPath(split_query(export_dir)[0])
    name = path.parent.parent.name if path.parent.name == "exports" else path.name
    if is_uri(export_dir):
        return name, None
    try:
        source = inspect_pretrained(export_dir)
    except ConfigError as error:
        raise ConfigError(f"serve.export_dir={str(error).removeprefix(f'{FIELD}=')}") from None
    return name, source.model.block_size


def check_dtype(dtype: str, export_dir: str) -> None:
    """serve.dtype chooses a Hugging Face directory's serving precision; an export has its own."""
    from lm.config import SERVE_DTYPES, ConfigError
    from lm.remote_files import is_uri

    if dtype not in SERVE_DTYPES:
        raise ConfigError(f"serve.dtype={dtype!r} is invalid: allowed are {', '.join(SERVE_DTYPES)}")
    if dtype != "auto" and not is_uri(export_dir) and (Path(export_dir) / "export.json").exists():
        raise ConfigError(f"serve.dtype={dtype} is invalid for an export, which serves in the precision it was "
                          f"exported in (export.precision={dtype} makes one); allowed: auto")


def check_request_router(value: str) -> None:
    """serve.request_router: how the ingress picks a model replica for each request."""
    from lm.config import REQUEST_ROUTERS, ConfigError

    if value not in REQUEST_ROUTERS:
        raise ConfigError(f"serve.request_router={value!r} is invalid: allowed are {', '.join(REQUEST_ROUTERS)}")


def check_generation_config(value: str) -> None:
    """serve.generation_config: auto, none, or a local directory with a generation_config.json."""
    from lm.config import ConfigError

    if value not in ("auto", "none") and not (Path(value) / "generation_config.json").is_file():
        raise ConfigError(f"serve.generation_config={value!r} is invalid: allowed are auto (the model's "
                          "generation_config.json), none, or a directory holding a generation_config.json")


def check_max_model_len(max_model_len: int, context: int | None) -> None:
    """max_model_len fits the model's context (None: not known here; a replica checks it as it loads)."""
    from lm.config import ConfigError

    if context is not None and not 2 <= max_model_len <= context:
        raise ConfigError(f"serve.max_model_len={max_model_len} is invalid: must be between 2 and the model's "
                         f"context ({context})")


def _setting(args: dict, name: str, default):
    """args[name], or the default where it is missing or null (0 is a value, not a missing one)."""
    value = args.get(name)
    return default if value is None else value


def check_numbers(args: dict) -> None:
    """The numeric settings' ranges, for `serve run`'s args as for make serve's serve.* keys."""
    from lm.config import ConfigError
    from lm.prefix_cache import BLOCK_TOKENS

    rules = {
        "num_replicas": (lambda v: v >= 1, "an integer >= 1"),
        "max_batch_size": (lambda v: v >= 1, "an integer >= 1"),
        "cpus_per_replica": (lambda v: v > 0, "a number > 0 (a fraction shares a CPU)"),
        "gpus_per_replica": (lambda v: v >= 0, "a number >= 0"),
        "stream_interval_ms": (lambda v: v >= 0, "an integer >= 0"),
        "stream_events_per_s": (lambda v: v >= 0, "an integer >= 0 (0: no cap)"),
        "max_model_len": (lambda v: v >= 2, "an integer >= 2 (a prompt token and an answer token), or null for "
                                            "the model's context"),
        "max_num_batched_tokens": (lambda v: v >= 1, "an integer >= 1, or null for 256 on CPUs and 2048 on GPUs"),
        "prefix_cache_tokens": (lambda v: v == 0 or v >= BLOCK_TOKENS,
                                f"at least {BLOCK_TOKENS} (one block), 0 (off), or null for 4 x max_model_len"),
    }
    for name, (ok, described) in rules.items():
        value = args.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value)):
            raise ConfigError(f"serve.{name}={value!r} is invalid: must be {described}")


BUILD_ARGS = {"export_dir", "run_name", "storage", "api_key", "num_replicas", "autoscaling", "max_batch_size",
              "cpus_per_replica", "gpus_per_replica", "stream_interval_ms", "stream_events_per_s", "compile",
              "max_model_len", "dtype", "generation_config", "prefix_cache_tokens", "max_num_batched_tokens",
              "request_router"}


def build(args: dict):
    """Application builder for `serve run` / `serve deploy` (args from cluster/serve.yaml) and make serve.

    args: export_dir, or run_name (+ storage) for that run's newest export; api_key (or the
    LMSTACK_API_KEY environment variable); num_replicas; autoscaling; max_batch_size;
    cpus_per_replica; gpus_per_replica (> 0 places replicas on GPUs); stream_interval_ms; stream_events_per_s;
    compile (compile the decode step ahead of time when a replica starts); max_model_len (tokens a
    sequence may hold; default: the model's context); dtype (auto, fp32, bf16: a Hugging Face
    directory's weights as served); generation_config (auto, none or a directory: where requests'
    unset sampling values come from); prefix_cache_tokens (the prefix cache's size per replica, 0: off;
    default: 4 x max_model_len); max_num_batched_tokens (chunked prefill's tokens per step; default:
    256 on CPUs, 2048 on GPUs); request_router (power_of_two, the default: Serve's, by load alone;
    prefix_affinity: a prompt goes to the replica holding its prefix, launcher.prefix_router)."""
    unknown = set(args) - BUILD_ARGS
    if unknown:
        raise ValueError(f"unknown serve args {sorted(unknown)}: allowed are {sorted(BUILD_ARGS)}")
    from launcher.schema import absolute

    check_numbers(args)
    router = args.get("request_router") or "power_of_two"
    check_request_router(router)
    if args.get("export_dir"):
        export_dir = absolute(args["export_dir"])
    else:
        export_dir = newest_export(absolute(args.get("storage") or "outputs/runs"), args.get("run_name"))
    dtype = args.get("dtype") or "auto"
    check_dtype(dtype, export_dir)
    model_name, context = served_model(export_dir)
    generation_config = str(args.get("generation_config") or "auto")
    if generation_config not in ("auto", "none"):
        generation_config = str(absolute(generation_config))
    check_generation_config(generation_config)
    max_model_len = args.get("max_model_len")
    if max_model_len is not None:
        check_max_model_len(int(max_model_len), context)
    replicas = int(_setting(args, "num_replicas", 1))
    batch = int(_setting(args, "max_batch_size", 16))
    cpus = float(_setting(args, "cpus_per_replica", 1))
    gpus = float(_setting(args, "gpus_per_replica", 0))
    options = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}, "max_ongoing_requests": max(4 * batch, 32)}
    if router == "prefix_affinity" and replicas > 1:
        # A replica with more than 2 requests beyond the least busy one (on GPUs, where a decode batch
        # costs little more for a few more sequences, an eighth of a batch) loses its prefixes' requests:
        # looser balances cost time to first token and tokens/s on CPUs (benchmarks/RESULTS.md).
        imbalance = max(2, batch // 8) if gpus > 0 else 2
        options["request_router_config"] = {"request_router_class": PrefixAffinityRouter,
                                            "request_router_kwargs": {"max_imbalance": imbalance}}
    if args.get("autoscaling"):
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": replicas,
                                         "target_ongoing_requests": batch}
    else:
        options["num_replicas"] = replicas
    model = LanguageModel.options(**options).bind(
        str(export_dir), batch, max(1, int(cpus)), use_gpu=gpus > 0,
        stream_interval_ms=int(_setting(args, "stream_interval_ms", 40)),
        stream_events_per_s=int(_setting(args, "stream_events_per_s", 100)), compile=bool(args.get("compile", False)),
        max_model_len=None if max_model_len is None else int(max_model_len), dtype=dtype,
        generation_config=generation_config, prefix_cache_tokens=args.get("prefix_cache_tokens"),
        max_num_batched_tokens=args.get("max_num_batched_tokens"), model_name=model_name)
    api_key = args.get("api_key") or os.environ.get("LMSTACK_API_KEY")
    print(f"serving {model_name} from {export_dir}", flush=True)
    return OpenAIServer.options(ray_actor_options={"num_cpus": 0}).bind(model, model_name, api_key)
