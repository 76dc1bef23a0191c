"""PrefixAffinityRouter: Serve's request router for LLMServer, sending a prompt to the replica that
most likely holds its prefix in its KV prefix cache, unless that replica is much busier.

It runs inside each caller's handle (the ingress). It remembers, per block-sized piece of prompt
(named by the same chained hash as the engine's prefix cache), the replica it last sent that
prefix to; a new prompt goes to the replica behind its longest remembered prefix, else to the
less loaded of two random replicas (power of two choices).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from model_parallel.block_manager import chain_hash


def prefix_hashes(tokens: list[int], block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's first full blocks, shortest prefix first."""
    hashes: list[int] = []
    for i in range(min(len(tokens) // block_size, max_blocks)):
        hashes.append(
            chain_hash(
                hashes[-1] if hashes else None, tokens[i * block_size : (i + 1) * block_size]
            )
        )
    return hashes


def prompt_of(request: PendingRequest | None) -> list[int] | None:
    """The prompt token ids of an LLMServer.generate call (args: request id, prompt, ...)."""
    if request is None or len(request.args) < 2 or not isinstance(request.args[1], list):
        return None
    return request.args[1]


def affine_replica(
    hashes: list[int],
    owner: Mapping[int, ReplicaID],
    loads: dict[ReplicaID, int | None],
    min_prefix_blocks: int,
    imbalance: int,
) -> ReplicaID | None:
    """The candidate (a key of `loads`, its requests in flight or None when unknown) behind the
    longest remembered prefix of at least `min_prefix_blocks` blocks, unless it has more than
    `imbalance` requests more than the least busy candidate."""
    for depth in range(len(hashes), min_prefix_blocks - 1, -1):
        replica_id = owner.get(hashes[depth - 1])
        if replica_id in loads:
            break
    else:
        return None
    known = [q for q in loads.values() if q is not None]
    mine = loads[replica_id]
    if mine is not None and mine - min(known) > imbalance:
        return None
    return replica_id


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """NOTE: a routing decision is made for one pending request; Serve's base router hands the
    chosen replica to the pending request with the same internal request id, but every handle
    call made while serving one HTTP request shares that id (a completions request with several
    prompts makes several calls), and the later calls would never be routed. So: the request
    with that id while it is pending, else the oldest pending one (FIFOMixin)."""

    def _get_pending_request_matching_metadata(
        self, request_metadata: Any = None
    ) -> PendingRequest | None:
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    def initialize_state(
        self,
        block_size: int = 16,
        min_prefix_blocks: int = 4,
        max_prefix_blocks: int = 128,
        max_entries: int = 200_000,
        imbalance: int = 8,
    ) -> None:
        """Prefixes shorter than `min_prefix_blocks` (a chat template's fixed header) do not
        bind a request to a replica. `imbalance`: how many more requests in flight than the least
        busy replica the prefix's replica may have and still be chosen."""
        self.block_size = block_size
        self.min_prefix_blocks = max(1, min_prefix_blocks)
        self.max_prefix_blocks = max_prefix_blocks
        self.max_entries = max_entries
        self.imbalance = imbalance
        self.owner: OrderedDict[int, ReplicaID] = OrderedDict()  # prefix hash -> replica, LRU

    def _hashes(self, request: PendingRequest | None) -> list[int]:
        prompt = prompt_of(request)
        if prompt is None:
            return []
        return prefix_hashes(prompt, self.block_size, self.max_prefix_blocks)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        balanced = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        candidates = {r.replica_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        chosen = affine_replica(
            self._hashes(pending_request),
            self.owner,
            {r: cache.get(r) for r in candidates},
            self.min_prefix_blocks,
            self.imbalance,
        )
        return [[candidates[chosen]], balanced] if chosen is not None else [balanced]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        for h in self._hashes(pending_request):
            self.owner[h] = replica_id
            self.owner.move_to_end(h)
        while len(self.owner) > self.max_entries:
            self.owner.popitem(last=False)
