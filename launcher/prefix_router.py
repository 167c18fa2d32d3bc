"""Prefix-aware request routing across model replicas: a request goes to the replica that already
holds the longest start of its prompt in its prefix cache, unless that replica is much busier than
the others (what SGLang's cache-aware router and Ray Serve LLM's PrefixCacheAffinityRouter do;
Ray's needs vLLM installed).

Serve's default router (power of two choices) spreads requests by load alone: with N replicas, a
conversation's next turn finds its earlier turns cached with probability 1/N. Here the ingress's
router remembers which replica each recent prompt prefix went to (chained digests of fixed-size
blocks, as the replicas' own prefix caches key them) and prefers the replica with the longest match.
A prompt nobody has sent goes to the least busy replica, and is recorded there at once, so that the
n choices of one request, or the same new prompt sent at once by many clients, meet on it. The
preference for a holder gives way when the replica has more than `max_imbalance` requests in
flight beyond the least busy one: each sequence in a batch slows the others' steps, so that a few
more of them cost more than one prefill (on CPUs at once; on GPUs only past a large batch).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Hashable

import numpy as np
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

# 8 token ids, or about 15 tokens of English text: finer than the replicas' 16-token blocks, so that a
# short first turn is remembered too (a prompt's partial last block never matches a longer prompt)
BLOCK_BYTES = 64
ROUTED_METHOD = "generate"  # LanguageModel's method whose first argument is the prompt


def prompt_digests(prompt) -> list[bytes]:
    """Chained digests of a prompt's whole blocks (text as UTF-8, token ids as int64): block i's covers
    everything from the start through it. A prompt shorter than a block has one digest, of itself."""
    data = prompt.encode() if isinstance(prompt, str) else np.asarray(prompt, dtype=np.int64).tobytes()
    digests, parent = [], b""
    for start in range(0, max(len(data) - len(data) % BLOCK_BYTES, 1), BLOCK_BYTES):
        parent = hashlib.blake2b(parent + data[start:start + BLOCK_BYTES], digest_size=16).digest()
        digests.append(parent)
    return digests


class PrefixRoutes:
    """Which replicas each recent prompt prefix was sent to: up to `max_blocks` block digests, the least
    recently routed forgotten first."""

    def __init__(self, max_blocks: int = 100_000):  # ~6 MB of prompts remembered in ~20 MB
        self.max_blocks = max_blocks
        self.holders: OrderedDict[bytes, tuple] = OrderedDict()  # digest -> the replicas sent it

    def record(self, digests: list[bytes], replica: Hashable) -> None:
        for digest in digests:
            holders = self.holders.get(digest, ())
            if replica not in holders:
                self.holders[digest] = holders + (replica,)
            self.holders.move_to_end(digest)
        while len(self.holders) > self.max_blocks:
            self.holders.popitem(last=False)

    def longest_match(self, digests: list[bytes], replicas) -> set:
        """The replicas among `replicas` that were sent the longest prefix of the prompt (empty: none)."""
        candidates = set(replicas)
        for digest in reversed(digests):  # chained: holding block i means holding blocks 0..i
            found = candidates.intersection(self.holders.get(digest, ()))
            if found:
                return found
        return set()

    def choose(self, digests: list[bytes], loads: dict[Hashable, int], max_imbalance: int) -> list[list]:
        """Replicas in rank order for a prompt, given each candidate's requests in flight: the holders of
        its longest cached prefix, as long as they are within `max_imbalance` of the least busy, else the
        least busy (ties broken by the prompt's first block, so that concurrent requests for one new
        prompt agree); then all the others. The choice is recorded at once, so that the next of a
        request's n choices, routed before the first is confirmed, follows it."""
        least = min(loads.values())
        within = [replica for replica, load in loads.items() if load - least <= max_imbalance]
        preferred = sorted(self.longest_match(digests, within), key=str)
        if not preferred:
            preferred = [min(loads, key=lambda replica: (loads[replica], hashlib.blake2b(
                digests[0] + str(replica).encode(), digest_size=8).digest()))]
            self.record(digests, preferred[0])
        return [preferred, [replica for replica in loads if replica not in preferred]]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve's request router for the model deployment (`request_router_config`), kept in the
    ingress replica's process: prompts go to the replica that holds their prefix (PrefixRoutes).
    Other calls (tokenize, info) are routed by load, as Serve's default router does.

    The replica chosen for a request goes to that request (matched by its id), else to the oldest
    one waiting (FIFOMixin): a request's n choices are n calls under one id, which an exact match
    alone would leave waiting forever."""

    def _get_pending_request_matching_metadata(self, request_metadata=None):
        """FIFOMixin's hook: the request this replica was chosen for, while it waits."""
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    def initialize_state(self, max_imbalance: int = 2, max_blocks: int = 100_000):
        self.max_imbalance = max_imbalance
        self.routes = PrefixRoutes(max_blocks)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all replicas were considered
        prompt = _prompt(pending_request)
        if prompt is None or not candidate_replicas:
            return [candidate_replicas]  # Serve picks the least busy that accepts
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {replica_id: cache.get(replica_id) or 0 for replica_id in by_id}
        ranks = self.routes.choose(prompt_digests(prompt), loads, self.max_imbalance)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        prompt = _prompt(pending_request)
        if prompt is not None:
            self.routes.record(prompt_digests(prompt), replica_id)


def _prompt(pending_request: PendingRequest | None):
    """A generate call's prompt (text or token ids), or None for any other call."""
    if pending_request is None or pending_request.metadata.call_method != ROUTED_METHOD or not pending_request.args:
        return None
    prompt = pending_request.args[0]
    return prompt if isinstance(prompt, (str, list)) else None
