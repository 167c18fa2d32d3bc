"""Batched decoding with a KV cache and continuous batching, for serving and sampling.

The engine owns `max_batch_size` cache slots. Each `step()` first admits waiting requests into free
slots (prefilling their prompts), then decodes one token for every running sequence in a single
batched forward. New requests therefore join between decode steps instead of waiting for a batch
to finish, and a finished sequence frees its slot at once. Each request samples with its own
generator, so the same seed gives the same text whatever else is in the batch.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from lm.model import GPT


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None


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
    finish_reason: Optional[str] = None  # "stop" or "length"
    slot: Optional[int] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    def __init__(self, model: GPT, tokenizer, max_batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_limit = tokenizer.vocab_size  # padded embedding rows are never sampled
        cfg = model.cfg
        self.context = cfg.block_size
        shape = (max_batch_size, cfg.block_size, cfg.n_head, cfg.n_embd // cfg.n_head)
        dtype, device = model.wte.weight.dtype, model.wte.weight.device
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.free_slots = list(range(max_batch_size))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("prompt", "must not be empty")
        if len(prompt_ids) >= self.context:
            raise RequestError("prompt", f"{len(prompt_ids)} tokens do not fit the context of {self.context} "
                                         "tokens with room for an answer")
        room = self.context - len(prompt_ids)
        if not 1 <= params.max_tokens <= room:
            raise RequestError("max_tokens", f"must be between 1 and {room} for this prompt (context {self.context})")
        if params.temperature < 0:
            raise RequestError("temperature", "must be >= 0")
        if not 0 < params.top_p <= 1:
            raise RequestError("top_p", "must be in (0, 1]")
        if params.top_k is not None and params.top_k < 1:
            raise RequestError("top_k", "must be >= 1")

    def submit(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = Sequence(next(self._ids), prompt_ids, params, generator)
        self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Sequence]:
        """Admit waiting requests, decode one token for every running one; return those that advanced."""
        advanced = []
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            logits = self._forward([seq.prompt_ids], [0], [seq.slot])
            self._append(seq, logits[0])
            advanced.append(seq)
            (self._release if seq.finished else self.running.append)(seq)
        decoding = [s for s in self.running if s not in advanced]
        if decoding:
            logits = self._forward([[s.output_ids[-1]] for s in decoding],
                                   [len(s.prompt_ids) + len(s.output_ids) - 1 for s in decoding],
                                   [s.slot for s in decoding])
            for seq, row in zip(decoding, logits):
                self._append(seq, row)
                advanced.append(seq)
                if seq.finished:
                    self.running.remove(seq)
                    self._release(seq)
        return advanced

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run prompts to completion together (a convenience over submit/step)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        while any(not s.finished for s in seqs):
            self.step()
        return seqs

    def _forward(self, ids: list[list[int]], positions: list[int], slots: list[int]) -> torch.Tensor:
        device = self.model.wte.weight.device
        logits = self.model.forward_cached(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                           torch.tensor(slots, device=device), self.k_caches, self.v_caches)
        return logits[:, :self.vocab_limit].cpu()

    def _append(self, seq: Sequence, logits: torch.Tensor) -> None:
        token = sample_next(logits, seq.params, seq.generator)
        if token == getattr(self.tokenizer, "eot_id", None):
            seq.finish_reason = "stop"
            return
        seq.output_ids.append(token)
        seq.text = self.tokenizer.decode(seq.output_ids)
        for stop in seq.params.stop:
            cut = seq.text.find(stop)
            if cut != -1:
                seq.text, seq.finish_reason = seq.text[:cut], "stop"
                return
        if len(seq.output_ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"

    def _release(self, seq: Sequence) -> None:
        self.free_slots.append(seq.slot)
