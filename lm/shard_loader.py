"""Batches of training windows from a token file: disjoint across ranks, deterministic from the
seed, and resumable from one integer."""

from __future__ import annotations

import numpy as np


class TokenShardLoader:
    """Batches of (input, target) windows, disjoint across ranks, deterministic from the seed.

    The token stream is cut into non-overlapping windows of seq_len+1 tokens; each epoch visits
    them in a permutation drawn from (seed, epoch). A global batch takes the next
    micro_batch x world_size windows, and rank r takes its own contiguous slice of them. The
    whole state is one integer, `position` (windows consumed globally), so resume is exact.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, rank: int,
                 world_size: int, seed: int, loss_mask: np.ndarray | None = None):
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.loss_mask = loss_mask  # targets where it is 0 become -100 (ignored by the loss)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one window of {seq_len}+1 tokens")
        self.position = 0
        self._epoch, self._order = -1, None

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def _window(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.num_windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._order[offset])

    def window_indices(self) -> list[int]:
        """The windows this rank takes for the next micro batch (without consuming them)."""
        start = self.position + self.rank * self.micro_batch
        return [self._window(start + i) for i in range(self.micro_batch)]

    def next_batch(self):
        import torch

        windows = [slice(w * self.seq_len, w * self.seq_len + self.seq_len + 1) for w in self.window_indices()]
        self.position += self.micro_batch * self.world_size
        batch = torch.from_numpy(np.stack([self.tokens[w] for w in windows]).astype(np.int64))
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if self.loss_mask is not None:
            keep = torch.from_numpy(np.stack([self.loss_mask[w][1:] for w in windows]).astype(bool))
            y = y.masked_fill(~keep, -100)
        return x, y
