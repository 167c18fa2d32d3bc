"""Prefix caching: keys and values already computed for the start of a prompt are reused, not
prefilled again (vLLM's automatic prefix caching).

Chat requests repeat themselves: every request of a deployment starts with the same system prompt,
and each turn of a conversation resends the turns before it. The cache keeps the keys and values of
fixed-size token blocks, each found by a digest of every token from the start of the sequence
through that block, so a block is reused only where the whole prefix before it matches too (keys
and values depend on every earlier token, and a GPT-2's on the absolute position). Blocks are
copied in and out of the engine's cache slots; least recently used blocks go first when the cache
is full.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

BLOCK_TOKENS = 16  # vLLM's default block size


def block_digests(tokens: list[int], blocks: int) -> list[bytes]:
    """The digest of each of the first `blocks` blocks of `tokens`, chained: block i's covers tokens
    0..(i+1)*BLOCK_TOKENS-1."""
    digests, parent = [], b""
    data = np.asarray(tokens[:blocks * BLOCK_TOKENS], dtype=np.int64).tobytes()
    step = BLOCK_TOKENS * 8
    for i in range(blocks):
        parent = hashlib.blake2b(parent + data[i * step:(i + 1) * step], digest_size=16).digest()
        digests.append(parent)
    return digests


class PrefixCache:
    """Up to `max_tokens` tokens' keys and values (every layer's), in blocks of BLOCK_TOKENS."""

    def __init__(self, max_tokens: int):
        self.max_blocks = max_tokens // BLOCK_TOKENS
        # digest -> (keys, values), each (layers, kv heads, BLOCK_TOKENS, head dim); oldest use first
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.queries = 0  # prompt tokens found cached / looked up (for the server's stats)

    def load(self, prompt_ids: list[int], slot: int, k_caches: list[torch.Tensor],
             v_caches: list[torch.Tensor]) -> int:
        """Copy the prompt's longest cached prefix into a cache slot from position 0; return its length
        in tokens. At least the prompt's last token is left to prefill: its logits give the first
        sampled token."""
        found = []
        for digest in block_digests(prompt_ids, (len(prompt_ids) - 1) // BLOCK_TOKENS):
            if digest not in self.blocks:
                break
            found.append(digest)
        for digest in reversed(found):  # a prefix's first blocks stay the most recently used
            self.blocks.move_to_end(digest)
        length = len(found) * BLOCK_TOKENS
        self.queries += len(prompt_ids)
        self.hits += length
        if found:
            for layer, (k_cache, v_cache) in enumerate(zip(k_caches, v_caches)):
                k_cache[slot, :, :length] = torch.cat([self.blocks[d][0][layer] for d in found], dim=1)
                v_cache[slot, :, :length] = torch.cat([self.blocks[d][1][layer] for d in found], dim=1)
        return length

    def store(self, tokens: list[int], slot: int, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Keep the full blocks of `tokens`, whose keys and values are in the slot from position 0."""
        digests = block_digests(tokens, min(len(tokens) // BLOCK_TOKENS, self.max_blocks))
        for i, digest in reversed(list(enumerate(digests))):  # first blocks last: most recently used
            if digest in self.blocks:
                self.blocks.move_to_end(digest)
                continue
            span = slice(i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS)
            self.blocks[digest] = (torch.stack([k[slot, :, span] for k in k_caches]),
                                   torch.stack([v[slot, :, span] for v in v_caches]))
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        self.blocks.clear()
