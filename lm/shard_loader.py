"""Batches of training windows from a token file: disjoint across ranks, deterministic from the
seed, and resumable from one integer."""

from __future__ import annotations

import numpy as np

MIX_BLOCK = 1024  # a mixture's windows are dealt out in blocks of this many (its weights' resolution)


class _Permutations:
    """Window k of a stream of `count` windows, epoch after epoch: each epoch a permutation drawn from
    (seed, *key, epoch)."""

    def __init__(self, count: int, seed: int, key: tuple = ()):
        self.count, self.seed, self.key = count, seed, key
        self._epoch, self._order = -1, None

    def __getitem__(self, k: int) -> int:
        epoch, offset = divmod(k, self.count)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, *self.key, epoch]).permutation(self.count)
            self._epoch = epoch
        return int(self._order[offset])


class _Mixture:
    """Which source the g-th window of a mixture comes from, and how many of that source's windows came
    before it: a pure function of g, so a loader's state stays one integer. Each block of MIX_BLOCK
    windows holds every source's share of the weights (largest remainder), in an order drawn from the
    seed and the block."""

    def __init__(self, weights: list[float], seed: int):
        shares = np.asarray(weights, dtype=np.float64) / sum(weights) * MIX_BLOCK
        counts = np.floor(shares).astype(np.int64)
        counts[np.argsort(-(shares - counts), kind="stable")[:MIX_BLOCK - counts.sum()]] += 1
        self.counts, self.seed = counts, seed
        self._block, self._sources, self._ranks = -1, None, None

    def __getitem__(self, g: int) -> tuple[int, int]:
        block, offset = divmod(g, MIX_BLOCK)
        if block != self._block:
            sources = np.random.default_rng([self.seed, 1 << 20, block]).permutation(
                np.repeat(np.arange(len(self.counts)), self.counts))
            ranks = np.zeros(MIX_BLOCK, dtype=np.int64)  # earlier windows of the same source in the block
            for s in range(len(self.counts)):
                where = sources == s
                ranks[where] = np.arange(where.sum())
            self._block, self._sources, self._ranks = block, sources, ranks
        source = int(self._sources[offset])
        return source, block * int(self.counts[source]) + int(self._ranks[offset])


class TokenShardLoader:
    """Batches of (input, target) windows, disjoint across ranks, deterministic from the seed.

    The token stream is cut into non-overlapping windows of seq_len+1 tokens; each epoch visits
    them in a permutation drawn from (seed, epoch). A global batch takes the next
    micro_batch x world_size windows, and rank r takes its own contiguous slice of them. The
    whole state is one integer, `position` (windows consumed globally), so resume is exact.

    `mixture`: the stream is several sources one after another, [(first token, end token, weight)];
    each window comes from a source drawn by weight (`_Mixture`), and each source is cut into windows
    and visited epoch by epoch on its own, so a small source repeats while a large one goes on.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, rank: int,
                 world_size: int, seed: int, loss_mask: np.ndarray | None = None,
                 mixture: list[tuple[int, int, float]] | None = None):
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.loss_mask = loss_mask  # targets where it is 0 become -100 (ignored by the loss)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        segments = [(start, end) for start, end, _ in mixture] if mixture else [(0, len(tokens))]
        self.starts = [start for start, _ in segments]
        self.sources = []
        for i, (start, end) in enumerate(segments):
            count = (end - start - 1) // seq_len
            if count < 1:
                raise ValueError(f"{end - start} tokens are too few for one window of {seq_len}+1 tokens"
                                 + (f" (source {i} of the mixture)" if mixture else ""))
            self.sources.append(_Permutations(count, seed, (i,) if mixture else ()))
        self.mixture = _Mixture([weight for _, _, weight in mixture], seed) if mixture else None
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def _window(self, global_index: int) -> tuple[int, int]:
        """The source of the global_index-th window, and its first token."""
        source, k = self.mixture[global_index] if self.mixture else (0, global_index)
        return source, self.starts[source] + self.sources[source][k] * self.seq_len

    def _next_windows(self) -> list[tuple[int, int]]:
        start = self.position + self.rank * self.micro_batch
        return [self._window(start + i) for i in range(self.micro_batch)]

    def window_starts(self) -> list[int]:
        """The windows this rank takes for the next micro batch (without consuming them)."""
        return [start for _, start in self._next_windows()]

    def window_sources(self) -> list[int]:
        """The sources of those windows (all 0 without a mixture)."""
        return [source for source, _ in self._next_windows()]

    def next_batch(self):
        import torch

        windows = [slice(w, w + self.seq_len + 1) for w in self.window_starts()]
        self.position += self.micro_batch * self.world_size
        batch = torch.from_numpy(np.stack([self.tokens[w] for w in windows]).astype(np.int64))
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if self.loss_mask is not None:
            keep = torch.from_numpy(np.stack([self.loss_mask[w][1:] for w in windows]).astype(bool))
            y = y.masked_fill(~keep, -100)
        return x, y
