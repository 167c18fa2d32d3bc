"""The model deployment of the serving application: one lm.engine per replica, driven by a decode
thread.

Requests submit sequences and read their text from per-request queues, so concurrent requests
share batched decode steps and new ones join between steps. The thread steps back to back while
there is work and hands each step's text to the event loop, which streams it out meanwhile: decoding
never waits for the loop (the compiled step and torch's kernels release the GIL), and the loop never
waits for a step.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from dataclasses import replace

from ray import serve


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold back while streaming: a possible start of a stop string,
    or an incomplete UTF-8 character that the byte-level decoder shows as U+FFFD."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":
        hold += 1
    return hold


def hf_serving_dtype(directory: str, dtype: str, use_gpu: bool) -> str:
    """serve.dtype for a Hugging Face directory: auto is bf16 on a GPU where the model was saved in 16
    bits (its config's torch_dtype, `dtype` since transformers 5), as vLLM's auto, and fp32 on CPUs
    (where bf16 decodes small batches no faster: benchmarks/RESULTS.md)."""
    import json
    from pathlib import Path

    if dtype != "auto":
        return dtype
    config = json.loads((Path(directory) / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype")
    return "bf16" if use_gpu and saved in ("bfloat16", "float16") else "fp32"


def model_created(directory) -> int:
    """The model object's `created` (unix seconds): when the export was written (its export.json says;
    older exports and Hugging Face directories: their config.json's modification time)."""
    import json

    report = directory / "export.json"
    if report.exists() and "created" in (fields := json.loads(report.read_text())):
        return int(fields["created"])
    return int((directory / "config.json").stat().st_mtime)


FAILED_STEPS_UNHEALTHY = 3  # decode steps failed in a row after which a replica reports itself unhealthy


# A replica being stopped (Ctrl-C, a scale-down, a new version) waits for its requests in flight, checking
# every graceful_shutdown_wait_loop_s; Serve's 2 s made every stop of an idle server take 2 s per deployment.
SHUTDOWN_CHECK_S = 0.25


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S)
class LanguageModel:
    def __init__(self, export_dir: str, max_batch_size: int, threads: int, use_gpu: bool = False,
                 stream_interval_ms: int = 40, stream_events_per_s: int = 100, compile: bool = False,
                 max_model_len: int | None = None, dtype: str = "auto", generation_config: str = "auto",
                 prefix_cache_tokens: int | None = None, max_num_batched_tokens: int | None = None,
                 model_name: str = "model"):
        import tempfile

        import torch

        from pathlib import Path

        from launcher.run_dir import local_directory
        from launcher.serve_metrics import EngineMetrics
        from lm.engine import Engine
        from lm.export import load_export
        from lm.pretrained import load_hf_directory, sampling_defaults

        torch.set_num_threads(threads)
        # An export in an object store is downloaded once per node (the replicas there share it).
        local = local_directory(export_dir, f"{tempfile.gettempdir()}/lmstack-exports")
        device = "cuda" if use_gpu else "cpu"
        hf_directory = local
        if (Path(local) / "export.json").exists():
            model, tokenizer, _, precision = load_export(local, device=device)
            hf_directory = Path(local) / "hf"
        else:  # a Hugging Face model directory, served as it is, in serve.dtype
            model, tokenizer = load_hf_directory(local)
            precision = hf_serving_dtype(local, dtype, use_gpu)
            model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        if prefix_cache_tokens is None:  # about four whole sequences' keys and values
            prefix_cache_tokens = 4 * (max_model_len or model.cfg.block_size)
        self.engine = Engine(model, tokenizer, max_batch_size, compile=compile, max_model_len=max_model_len,
                             prefix_cache_tokens=prefix_cache_tokens,
                             max_num_batched_tokens=max_num_batched_tokens or (2048 if use_gpu else 256))
        # Every streamed item crosses two actors and becomes an SSE event; under load that costs more
        # CPU than decoding. Tokens that arrive within the interval go out together, and with many
        # streams each one's interval grows so that together they send about stream_events_per_s.
        self.stream_interval = stream_interval_ms / 1000
        self.stream_events_per_s = stream_events_per_s
        template = tokenizer.chat_template
        self.info_ = {"context": self.engine.context, "precision": precision, "export_dir": export_dir,
                      "created": model_created(Path(local)),
                      "chat_template": None if template is None else template.to_json(),
                      "sampling_defaults": {} if generation_config == "none" else
                      sampling_defaults(hf_directory if generation_config == "auto" else generation_config)}
        self.metrics = EngineMetrics(model_name, prefix_caching=self.engine.prefix_cache is not None)
        self.abandoned = 0
        self.queues: dict[int, asyncio.Queue] = {}
        self.grammars: dict = {}  # guided decoding's compiled schemas, by schema text
        self.loop: asyncio.AbstractEventLoop | None = None
        self.work = threading.Event()  # set on submit; the decode thread sleeps on it when idle
        self.decoder: threading.Thread | None = None  # started by the first request
        self.failed_steps, self.last_failure = 0, ""  # decode steps failed in a row, and the last one's error

    def check_health(self) -> None:
        """Serve's health check (every 10 s): a replica whose decode thread has stopped, or whose last
        FAILED_STEPS_UNHEALTHY decode steps all failed (a CUDA error leaves a process unable to compute),
        raises, and Serve replaces it with a fresh one rather than leave requests hanging or failing."""
        if self.decoder is not None and not self.decoder.is_alive():
            raise RuntimeError("the decode thread has stopped")
        if self.failed_steps >= FAILED_STEPS_UNHEALTHY:
            raise RuntimeError(f"the last {self.failed_steps} decode steps failed: {self.last_failure}")

    def info(self) -> dict:
        """The model's context, precision, chat template (None: the built-in one) and sampling defaults
        (its generation_config.json's, as vLLM takes them), and this replica's load: sequences in a
        slot (prefilling or decoding) and waiting for one, how many requests were abandoned by their
        clients mid-decode, and the share of prompt tokens found in the prefix cache (None: off)."""
        cache = self.engine.prefix_cache
        running, waiting = self._load()
        return {**self.info_, "running": running, "waiting": waiting, "abandoned": self.abandoned,
                "prefix_cache_hit_rate": None if cache is None else cache.hits / max(cache.queries, 1)}

    def tokenizer_info(self) -> dict:
        """What vLLM's /tokenizer_info tells clients that tokenize on the server (lm-evaluation-harness)."""
        from lm.chat_template import BUILTIN

        tokenizer = self.engine.tokenizer
        eot = getattr(tokenizer, "eot_id", None)
        template = tokenizer.chat_template or BUILTIN
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                "model_max_length": self.engine.context, "eos_token": None if eot is None else tokenizer.decode([eot]),
                "bos_token": None, "pad_token": None, **template.special_tokens, "chat_template": template.source}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids)

    def _decode_forever(self) -> None:
        """The decode thread. Each update is (text, finished, logprobs) taken right after the step, so the loop
        never reads a sequence the next step is changing."""
        while True:
            self.work.clear()  # before looking for work: a submit after the look sets it again
            while self.engine.has_work:
                prefilled: set[int] = set()
                try:
                    # New requests' first tokens go out before the running batch's decode step.
                    advanced = self.engine.step(on_prefilled=lambda seqs: prefilled.update(self._hand_over(seqs)))
                    self._hand_over([seq for seq in advanced if seq.id not in prefilled])
                    self.failed_steps = 0
                except Exception as error:  # a failed step fails the requests in flight, not the replica
                    traceback.print_exc()
                    self.failed_steps, self.last_failure = self.failed_steps + 1, repr(error)
                    ids = [seq.id for seq in self.engine.in_flight]
                    self.engine.cancel_all()
                    self.loop.call_soon_threadsafe(self._deliver, [(i, RuntimeError(f"decoding failed: {error}"))
                                                                   for i in ids])
            self.work.wait()

    def _hand_over(self, seqs: list) -> list[int]:
        """Send these sequences' text so far (and how many of their tokens have log-probabilities) to
        the event loop; returns their ids."""
        self.loop.call_soon_threadsafe(self._deliver, [(seq.id, (seq.text, seq.finished, len(seq.logprobs)))
                                                       for seq in seqs])
        return [seq.id for seq in seqs]

    def _deliver(self, updates: list) -> None:
        for seq_id, update in updates:
            queue = self.queues.get(seq_id)  # gone if its client disconnected
            if queue is not None:
                queue.put_nowait(update)
        self._report_load()

    def _load(self) -> tuple[int, int]:
        """Sequences in a slot (prefilling or decoding), and waiting for one."""
        engine = self.engine
        return len(engine.running) + len(engine.prefilling), len(engine.waiting)

    def _report_load(self) -> None:
        self.metrics.load(*self._load())

    def _interval(self) -> float:
        """Seconds between a stream's chunks: stream_interval_ms, or longer when this replica's
        streams together would send more than stream_events_per_s chunks (0: no such cap)."""
        if not self.stream_events_per_s:
            return self.stream_interval
        return max(self.stream_interval, len(self.queues) / self.stream_events_per_s)

    def _described(self, token: int, logprob) -> dict:
        """A token's text, its log-probability and its top alternatives' (None for a prompt's first)."""
        decode = self.engine.tokenizer.decode
        if logprob is None:
            return {"token": decode([token]), "logprob": None, "top": None}
        return {"token": decode([token]), "logprob": logprob.logprob,
                "top": [(decode([alternative]), value) for alternative, value in logprob.top]}

    async def generate(self, prompt, params, echo: bool = False, add_special_tokens: bool = True):
        """Events: {"delta": text} ..., then {"finish_reason", "prompt_tokens", "completion_tokens",
        "cached_tokens"} (the prompt's tokens found in the prefix cache);
        or one {"error", "param"} for a request the engine cannot serve. With `echo` the first delta
        is the prompt; with params.logprobs each delta carries its tokens' "logprobs"."""
        from lm.engine import RequestError

        if params.grammar is not None:  # requests with one schema share its grammar's cached masks
            if len(self.grammars) >= 32 and params.grammar.key not in self.grammars:  # <= 32 x 16 MiB of masks
                self.grammars.clear()
            params = replace(params, grammar=self.grammars.setdefault(params.grammar.key, params.grammar))
        arrived, first_token, failed = time.monotonic(), None, False
        try:
            seq = self.engine.submit(prompt, params, add_special_tokens)
        except RequestError as error:
            yield {"error": str(error), "param": error.field}
            return
        except ValueError as error:  # e.g. a character outside a character-level vocabulary
            yield {"error": f"prompt: {error}", "param": "prompt"}
            return
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[seq.id] = queue
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.decoder = threading.Thread(target=self._decode_forever, name="decode", daemon=True)
            self.decoder.start()
        self.work.set()
        sent, last_sent, described = 0, 0.0, 0
        try:
            if echo:
                event = {"delta": prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)}
                if params.logprobs is not None:  # scored in a thread of its own while decoding goes on
                    scored = await asyncio.to_thread(self.engine.prompt_logprobs, seq.prompt_ids, params.logprobs)
                    event["logprobs"] = [self._described(t, lp) for t, lp in zip(seq.prompt_ids, scored)]
                yield event
            while True:
                update = await queue.get()
                while not queue.empty():  # text that arrived meanwhile goes out as one delta
                    update = queue.get_nowait()
                if isinstance(update, Exception):
                    failed = True
                    raise update
                first_token = first_token or time.monotonic()
                text, finished, scored = update
                if not finished and sent and time.monotonic() - last_sent < self._interval():
                    continue  # the text so far goes with the next token
                upto = len(text) if finished else len(text) - _held_back(text, params.stop)
                if upto > sent or (finished and scored > described):
                    event = {"delta": text[sent:upto]}
                    if params.logprobs is not None:
                        event["logprobs"] = [self._described(lp.token, lp) for lp in seq.logprobs[described:scored]]
                        described = scored
                    yield event
                    sent, last_sent = upto, time.monotonic()
                if finished:
                    yield {"finish_reason": seq.finish_reason, "prompt_tokens": len(seq.prompt_ids),
                           "completion_tokens": len(seq.output_ids), "cached_tokens": seq.cached_tokens}
                    return
        finally:
            self.queues.pop(seq.id, None)
            if not seq.finished:  # the client went away: stop decoding for it
                self.engine.abort(seq)
                self.abandoned += 1
            self.metrics.request_finished(seq, arrived, first_token, time.monotonic(), "error" if failed else None)
            self._report_load()
