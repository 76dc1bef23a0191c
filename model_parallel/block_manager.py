"""The paged KV block pool: reference counts, block tables, prefix-cache hashes and LRU eviction.

A full block is named by a hash chained over every token before it, so two sequences that share a
prefix share its blocks. Freed blocks keep their hash and stay findable until the pool needs them
back; the least recently freed go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from model_parallel.request import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    # NOTE: Python's int/tuple hash is not salted per process, so every rank and replica agrees.
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self._seq_hashes: dict[int, list[int]] = {}  # seq id -> hashes of its full, computed blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[-1] if hashes else None
            hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks covering a prefix of the sequence. The last token is always computed,
        since its logits are what the step needs."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for h in self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | tuple[int, ...] = ()
    ) -> bool:
        """Grow the block table by `num_new_tokens`; False (and no change) if the pool cannot.
        `computed_blocks` (from get_computed_blocks) are shared in front of a new sequence."""
        bs = self.block_size
        total = seq.num_computed_tokens + len(computed_blocks) * bs + num_new_tokens
        needed = -(-total // bs) - len(seq.block_table) - len(computed_blocks)
        reclaimed = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if needed > self.num_free_blocks - reclaimed:
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(max(needed, 0)):
            seq.block_table.append(self._pop_free())
        return True

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Name the blocks now full of computed tokens so that others can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i, h in enumerate(self._block_hashes(seq, num_full)[:num_full]):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks are queued first, to be evicted before the
        shared heads of the chain; blocks nobody can find again are queued in front of all."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget the hashes of the blocks nobody holds (vLLM's reset_prefix_cache): a benchmark
        run then starts as cold as the first. Blocks in use keep theirs."""
        for block_id in self.free_queue:
            block = self.blocks[block_id]
            if block.hash is not None:
                del self.cached[block.hash]
                block.hash = None
