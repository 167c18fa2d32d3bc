"""Batched decoding with a KV cache and continuous batching, for serving and sampling.

The engine owns `max_batch_size` cache slots. Each `step()` admits waiting requests into free
slots, prefilling their prompts together, then decodes one token for every sequence that
was already running in a single batched forward. New requests therefore join between decode steps
instead of waiting for a batch to finish, and a finished sequence frees its slot at once (the last running
sequence moves into it, so the running batch always sits in slots 0..B-1 and is read as one view).
Each request samples with its own generator, so the same seed gives the same text whatever else is
in the batch. A request with a grammar (SamplingParams.grammar) is guided: only tokens the grammar
allows are sampled. With a prefix cache (lm.prefix_cache), a prompt that begins as an earlier
prompt or reply did is prefilled only after the cached blocks, which are copied into its slot. With
a token budget per step (chunked prefill), a long prompt is prefilled over several steps in a slot
above the running batch's, and moves next to them when it is whole.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lm.compiled_decode import CompiledDecodeStep
from lm.config import kv_heads
from lm.inference import optimize_for_decoding
from lm.json_guide import JsonGrammar, JsonGuide
from lm.model import GPT
from lm.prefix_cache import PrefixCache
from lm.tokenizer import stop_ids


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = 16  # None: as many as the context holds after the prompt
    temperature: float = 1.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    # Report each sampled token's log-probability and this many most likely alternatives (None: no
    # report). Log-probabilities are the model's own, before temperature, top-k and top-p.
    logprobs: Optional[int] = None
    # OpenAI's penalties on tokens already generated: logits -= frequency x count + presence x (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit
    # vLLM's (and Hugging Face's): a seen token's logit (prompt or output) is divided by this where
    # positive and multiplied where negative; 1: off.
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # vLLM's: tokens less likely than min_p x the most likely one are dropped
    min_tokens: int = 0  # vLLM's: no end (end-of-text, stop_token_ids) before this many tokens
    ignore_eos: bool = False  # vLLM's: end-of-text is never sampled, so the reply runs to max_tokens
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM's: these end the reply too (not in its text)
    # Guided decoding: the output is text this grammar accepts (a JSON Schema's documents, or one of a
    # list of strings), and the sequence ends when it is complete (lm.json_guide).
    grammar: Optional[JsonGrammar] = None


MAX_LOGPROBS = 20


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at that position, most likely first


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = F.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(token, float(logprobs[token]),
                        list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [])


class RequestError(ValueError):
    """A request the engine cannot serve; `field` names the offending parameter."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length", or "abort" (client gone)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id, when params.logprobs is set
    slot: Optional[int] = None
    prefilled: int = 0  # prompt tokens whose keys and values are in the slot (a cached prefix, chunks)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (OpenAI's usage.prompt_tokens_details)
    # Incremental detokenization: text is extended from the last few tokens, never re-decoded whole.
    prefix_offset: int = 0
    read_offset: int = 0
    aborted: bool = False
    prompt_seen: Optional[torch.Tensor] = None  # the prompt's tokens as a mask, once (repetition_penalty)
    guide: Optional[JsonGuide] = None  # where the output stands in params.grammar

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Tokens in the cache before the last sampled one (which the next decode step feeds in)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from (vocab,) logits with temperature, top-k and top-p (nucleus) filtering."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def adjusts_logits(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.presence_penalty or p.frequency_penalty or p.logit_bias or p.repetition_penalty != 1
                or p.ignore_eos or len(seq.output_ids) < p.min_tokens)


def adjust_logits(logits: torch.Tensor, seq: Sequence, end_ids: set[int]) -> None:
    """In place, before sampling: logit_bias, then the repetition, frequency and presence penalties,
    then the ends a request may not reach yet (`end_ids`: the engine's end-of-text tokens)."""
    p = seq.params
    if p.logit_bias:
        logits[list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
    if p.repetition_penalty != 1:  # on by default for models whose generation_config sets it: kept cheap
        if seq.prompt_seen is None:
            seq.prompt_seen = torch.zeros(logits.numel(), dtype=torch.bool)
            seq.prompt_seen[seq.prompt_ids] = True
        seen = seq.prompt_seen.clone()
        seen[seq.output_ids] = True
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if seq.output_ids and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(seq.output_ids), minlength=logits.numel())[:logits.numel()].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    barred = set(end_ids) if p.ignore_eos else set()
    if len(seq.output_ids) < p.min_tokens:
        barred |= set(end_ids) | set(p.stop_token_ids)
    if barred:
        logits[sorted(barred)] = float("-inf")


class Engine:
    """Owns the model it is given: its linear layers are re-laid out for decoding (lm.inference)."""

    def __init__(self, model: GPT, tokenizer, max_batch_size: int = 16, compile: bool = False,
                 max_model_len: int | None = None, prefix_cache_tokens: int = 0,
                 max_num_batched_tokens: int | None = None):
        self.model = optimize_for_decoding(model)
        self.tokenizer = tokenizer
        self.vocab_limit = tokenizer.vocab_size  # padded embedding rows are never sampled
        self.stop_ids = stop_ids(tokenizer)  # end-of-text (and a chat model's end of turn) ends a sequence
        cfg = model.cfg
        if max_model_len is not None and not 2 <= max_model_len <= cfg.block_size:
            raise ValueError(f"max_model_len={max_model_len} must be between 2 and the model's context "
                             f"({cfg.block_size})")
        self.context = max_model_len or cfg.block_size  # what a sequence may hold; the caches are this long
        self.max_batch_size = max_batch_size
        shape = (max_batch_size, kv_heads(cfg), self.context, cfg.n_embd // cfg.n_head)
        dtype, self.device = model.wte.weight.dtype, model.wte.weight.device
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.n_layer)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.n_layer)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # decoding; running[i] lives in cache slot i
        self.prefilling: list[Sequence] = []  # admitted, their prompts not yet all in their slots (>= len(running))
        # Chunked prefill (vLLM's max_num_batched_tokens): the tokens a step processes, decode tokens
        # included (at least one prompt token a step), so a long prompt is prefilled over several steps
        # while the running sequences keep decoding, instead of stalling them. None: no limit.
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= 1")
        self.max_num_batched_tokens = max_num_batched_tokens
        self._ids = itertools.count()
        # prefix_cache_tokens > 0: keys and values of prompts and replies are kept (lm.prefix_cache), so a
        # prompt that starts as an earlier one did prefills only what follows the shared blocks.
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        # compile: the decode step as an ahead-of-time compiled program (lm.compiled_decode), built
        # here, before any request: one program for every batch size up to max_batch_size.
        self.decode = CompiledDecodeStep(self.model, max_batch_size, self.k_caches, self.v_caches) if compile \
            else self.model.decode

    @property
    def free_slots(self) -> list[int]:
        held = {seq.slot for seq in self.prefilling}
        return [slot for slot in range(len(self.running), self.max_batch_size) if slot not in held]

    @property
    def in_flight(self) -> list[Sequence]:
        """Every request not finished: waiting for a slot, prefilling, decoding."""
        return [*self.waiting, *self.prefilling, *self.running]

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("prompt", "must not be empty")
        if not all(0 <= i < self.vocab_limit for i in prompt_ids):
            raise RequestError("prompt", f"token ids must be between 0 and {self.vocab_limit - 1}")
        if len(prompt_ids) >= self.context:
            raise RequestError("prompt", f"{len(prompt_ids)} tokens do not fit the context of {self.context} "
                                         "tokens with room for an answer")
        room = self.context - len(prompt_ids)
        if params.max_tokens is not None and not 1 <= params.max_tokens <= room:
            raise RequestError("max_tokens", f"must be between 1 and {room} for this prompt (context {self.context})")
        if params.temperature < 0:
            raise RequestError("temperature", "must be >= 0")
        if not 0 < params.top_p <= 1:
            raise RequestError("top_p", "must be in (0, 1]")
        if params.top_k is not None and params.top_k < 1:
            raise RequestError("top_k", "must be >= 1")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise RequestError("logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(params, name) <= 2:
                raise RequestError(name, "must be between -2 and 2")
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if not all(0 <= i < self.vocab_limit for i in ids):
                raise RequestError(name, f"token ids must be between 0 and {self.vocab_limit - 1}")
        if not all(-100 <= bias <= 100 for bias in params.logit_bias.values()):
            raise RequestError("logit_bias", "biases must be between -100 and 100")
        if params.repetition_penalty <= 0:
            raise RequestError("repetition_penalty", "must be > 0")
        if not 0 <= params.min_p <= 1:
            raise RequestError("min_p", "must be between 0 and 1")
        if not 0 <= params.min_tokens <= (params.max_tokens or room):
            raise RequestError("min_tokens", f"must be between 0 and max_tokens ({params.max_tokens or room})")

    def submit(self, prompt: str | list[int], params: SamplingParams, add_special_tokens: bool = True) -> Sequence:
        """A text prompt is encoded as transformers' `tokenizer(prompt)` would (BOS first, for a Llama
        tokenizer), unless add_special_tokens=False (a chat template's text, which holds them already)."""
        prompt_ids = (self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if isinstance(prompt, str)
                      else list(prompt))
        self.validate(prompt_ids, params)
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.context - len(prompt_ids))
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()  # this generator only: torch.seed() reseeds the global RNGs, CUDA's lazily (~1 ms)
        else:
            generator.manual_seed(params.seed)
        seq = Sequence(next(self._ids), prompt_ids, params, generator,
                       guide=params.grammar.guide() if params.grammar is not None else None)
        self.waiting.append(seq)
        return seq

    @staticmethod
    def abort(seq: Sequence) -> None:
        """Stop a request whose client went away; its slot is freed at the start of the next step.
        Only a flag is set, so this is safe while another thread is inside `step`."""
        seq.aborted = True

    def cancel_all(self) -> None:
        """Finish every request at once (after a failed step, whose state is unknown); all slots free."""
        for seq in self.in_flight:
            seq.finish_reason = seq.finish_reason or "abort"
        self.waiting.clear()
        self.prefilling.clear()
        self.running.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def step(self, on_prefilled: Callable[[list[Sequence]], None] | None = None) -> list[Sequence]:
        """Admit waiting requests into free slots and prefill their prompts (within the step's token
        budget: a long one over several steps), then decode one token for every sequence that was
        already running, in one batched forward; return the sequences that advanced. Prefills go
        first, so a first token never waits for a decode step; `on_prefilled` gets the sequences whose
        first token this step sampled as soon as it exists (a server streams it out meanwhile)."""
        for seq in [s for s in self.in_flight if s.aborted and not s.finished]:
            seq.finish_reason = "abort"
            if seq in self.waiting:
                self.waiting.remove(seq)
            elif seq in self.prefilling:
                self.prefilling.remove(seq)
            else:
                self._release(seq)
        batch = list(self.running)  # slots 0..len(batch)-1; sequences that finish their prefill take the next
        started = self._prefill(budget=None if self.max_num_batched_tokens is None
                                else max(1, self.max_num_batched_tokens - len(batch)))
        if started and on_prefilled is not None:
            on_prefilled(started)
        if batch:
            ids = torch.tensor([s.output_ids[-1] for s in batch], device=self.device)
            logits = self.decode(ids, [s.position for s in batch], self.k_caches, self.v_caches)[:, :self.vocab_limit]
            for seq, token, row in zip(batch, self._sample(batch, logits), logits):
                self._append(seq, token, row)
            for seq in [s for s in batch if s.finished]:
                self._release(seq)
        return started + batch

    def _prefill(self, budget: int | None) -> list[Sequence]:
        """Admit waiting requests into free slots, then prefill up to `budget` prompt tokens, oldest
        first. Sequences whose prompts are now whole sample their first token and join the running
        batch; they are returned."""
        self._admit()
        whole = []  # (sequence, its first token's logits)
        for start, chunks in self._schedule(budget).items():
            whole += self._prefill_chunks(start, chunks)
        if not whole:
            return []
        started = [seq for seq, _ in whole]
        for seq in started:
            self.prefilling.remove(seq)
            if self.prefix_cache is not None:
                self.prefix_cache.store(seq.prompt_ids, seq.slot, self.k_caches, self.v_caches)
            self._start_running(seq)
        logits = torch.stack([row for _, row in whole])[:, :self.vocab_limit]
        for seq, token, row in zip(started, self._sample(started, logits), logits):
            self._append(seq, token, row)
        for seq in [s for s in started if s.finished]:
            self._release(seq)
        return started

    def _admit(self) -> None:
        """Waiting requests into free slots, each after the longest cached prefix of its prompt."""
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size:
            seq = self.waiting.popleft()
            seq.slot = min(self.free_slots)  # prompts mostly finish in this order, each then already in place
            if self.prefix_cache is not None:
                seq.prefilled = seq.cached_tokens = self.prefix_cache.load(seq.prompt_ids, seq.slot, self.k_caches,
                                                                           self.v_caches)
            self.prefilling.append(seq)

    def _schedule(self, budget: int | None) -> dict[int, list[tuple[Sequence, int, Sequence]]]:
        """This step's chunks, oldest prompts first, within `budget` tokens (None: every prompt's rest):
        (sequence, tokens, the sequence whose row computes them) by the position they start at. A
        prompt that repeats the one before it at the same position (a request's n choices, submitted
        together) takes its chunk along, computed once, without counting against the budget."""
        chunks: dict[int, list[tuple[Sequence, int, Sequence]]] = {}
        source, count = None, 0
        for seq in self.prefilling:
            if not (source is not None and seq.prefilled == source.prefilled and seq.prompt_ids == source.prompt_ids):
                if budget is not None and budget <= 0:
                    source = None
                    continue
                left = len(seq.prompt_ids) - seq.prefilled
                source, count = seq, left if budget is None else min(left, budget)
                budget = None if budget is None else budget - count
            chunks.setdefault(seq.prefilled, []).append((seq, count, source))
        return chunks

    def _prefill_chunks(self, start: int,
                        chunks: list[tuple[Sequence, int, Sequence]]) -> list[tuple[Sequence, torch.Tensor]]:
        """Prefill chunks that start at one position in one forward, right-padded; return the sequences
        whose prompts are now whole, with their next-token logits. A chunk computed by another
        sequence's row (the same prompt) copies its keys and values and shares its logits."""
        computed = [(seq, count) for seq, count, source in chunks if source is seq]
        row_of = {id(seq): row for row, (seq, _) in enumerate(computed)}
        longest = max(count for _, count in computed)
        ids = torch.tensor([seq.prompt_ids[start:start + count] + [0] * (longest - count) for seq, count in computed],
                           device=self.device)
        logits = self.model.prefill(ids, [count for _, count in computed], [seq.slot for seq, _ in computed],
                                    self.k_caches, self.v_caches, start=start)
        whole = []
        for seq, count, source in chunks:
            row = row_of[id(source)]
            if source is not seq:
                for cache in (*self.k_caches, *self.v_caches):
                    cache[seq.slot, :, start:start + count] = cache[source.slot, :, start:start + count]
            seq.prefilled += count
            if seq.prefilled == len(seq.prompt_ids):
                whole.append((seq, logits[row]))
        return whole

    def _start_running(self, seq: Sequence) -> None:
        """Move a sequence whose prompt is whole into the slot after the running batch's, swapping
        with the prefilling sequence there, if any."""
        target = len(self.running)
        if seq.slot != target:
            other = next((s for s in self.prefilling if s.slot == target), None)
            for cache in (*self.k_caches, *self.v_caches):
                held = cache[target, :, :other.prefilled].clone() if other is not None else None
                cache[target, :, :seq.prefilled] = cache[seq.slot, :, :seq.prefilled]
                if other is not None:
                    cache[seq.slot, :, :other.prefilled] = held
            if other is not None:
                other.slot = seq.slot
            seq.slot = target
        self.running.append(seq)

    @torch.no_grad()
    def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first), from
        one forward over the prompt outside the cache: what a client asking to `echo` the prompt with
        logprobs scores (evaluation harnesses score text this way). Reads the model only, so it may
        run while another thread steps the engine."""
        ids = torch.tensor([prompt_ids], device=self.device)
        logits, _ = self.model(ids)
        logits = logits[0, :, :self.vocab_limit]
        return [None] + [token_logprob(logits[i - 1], prompt_ids[i], top) for i in range(1, len(prompt_ids))]

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run prompts to completion together (a convenience over submit/step)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        while any(not s.finished for s in seqs):
            self.step()
        return seqs

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Greedy rows in one argmax; sampled rows each with their own generator (seeded reproducibility);
        guided rows keep that choice when their grammar allows it."""
        logits = logits.cpu()
        adjusted = [i for i, seq in enumerate(batch) if adjusts_logits(seq)]
        if adjusted:
            logits = logits.clone()  # the caller's logits stay the model's own (logprobs report those)
            for i in adjusted:
                adjust_logits(logits[i], batch[i], self.stop_ids)
        greedy = logits.argmax(dim=-1).tolist()
        chosen = [greedy[i] if seq.params.temperature == 0 else sample_next(logits[i], seq.params, seq.generator)
                  for i, seq in enumerate(batch)]
        return [self._guided(seq, logits[i], chosen[i]) if seq.guide is not None else chosen[i]
                for i, seq in enumerate(batch)]

    def _guided(self, seq: Sequence, logits: torch.Tensor, choice: int) -> int:
        """The unconstrained choice if the grammar allows it, else a draw from the allowed tokens only
        (with plain temperature sampling, a refused draw then a masked one samples exactly the model's
        distribution renormalized over the allowed tokens; top-k and top-p then filter the allowed ones).
        -1 when the grammar allows nothing this vocabulary can spell (the sequence stops)."""
        table = self.token_bytes
        if (seq.guide.can_end if choice in self.stop_ids else seq.guide.allows(table[choice])):
            return choice
        allowed = seq.guide.mask(table).clone()
        for stop in self.stop_ids:
            allowed[stop] = seq.guide.can_end
        if not allowed.any():
            return -1
        logits = logits.masked_fill(~allowed, float("-inf"))
        return int(logits.argmax()) if seq.params.temperature == 0 else sample_next(logits, seq.params, seq.generator)

    @property
    def token_bytes(self) -> list[bytes | None]:
        return self.tokenizer.token_bytes()

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        if token in self.stop_ids or token < 0 or token in seq.params.stop_token_ids:
            self._finish(seq, "stop")
            return
        if seq.params.logprobs is not None:
            seq.logprobs.append(token_logprob(logits, token, seq.params.logprobs))
        seq.output_ids.append(token)
        before = len(seq.text)
        self._detokenize(seq)
        longest = max((len(s) for s in seq.params.stop), default=0)
        for stop in seq.params.stop:  # only where the new text could complete a stop string
            cut = seq.text.find(stop, max(0, before - longest + 1))
            if cut != -1:
                seq.text, seq.finish_reason = seq.text[:cut], "stop"
                return
        if seq.guide is not None:
            seq.guide.advance(self.token_bytes[token])
            if seq.guide.done:  # the document is complete: nothing the grammar allows may follow
                self._finish(seq, "stop")
                return
        if len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Flush text held back for an incomplete character, then mark the sequence finished."""
        if seq.read_offset < len(seq.output_ids):
            done = self.tokenizer.decode(seq.output_ids[seq.prefix_offset:seq.read_offset])
            seq.text += self.tokenizer.decode(seq.output_ids[seq.prefix_offset:])[len(done):]
            seq.read_offset = len(seq.output_ids)
        seq.finish_reason = reason

    def _detokenize(self, seq: Sequence) -> None:
        """Extend seq.text by the newest token's text. A few tokens of context are decoded again so
        byte-level pieces join correctly; an incomplete UTF-8 character waits for its next bytes."""
        ids = seq.output_ids
        done = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset])
        now = self.tokenizer.decode(ids[seq.prefix_offset:])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            seq.text += now[len(done):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's slot; the last running sequence moves into it, so slots stay 0..B-1."""
        slot, last = seq.slot, self.running[-1]
        if self.prefix_cache is not None:  # the prompt and the reply so far: a next turn starts with them
            self.prefix_cache.store((seq.prompt_ids + seq.output_ids)[:seq.position], slot, self.k_caches,
                                    self.v_caches)
        self.running.pop()
        if last is not seq:
            for cache in (*self.k_caches, *self.v_caches):
                cache[slot, :, :last.position + 1] = cache[last.slot, :, :last.position + 1]
            last.slot = slot
            self.running[slot] = last
