"""The KV block pool, checked with exact block ids, reference counts and eviction order."""

from __future__ import annotations

from model_parallel.block_manager import BlockManager
from model_parallel.request import SamplingParams, Sequence


def seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), len(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int, computed: list[int] | None = None) -> None:
    """What the scheduler and engine do for one step of `n` tokens."""
    assert bm.allocate_slots(s, n, computed or [])
    s.num_computed_tokens += len(computed or []) * bm.block_size + n
    bm.cache_full_blocks(s)


def test_allocate_grows_table_and_refuses_when_full() -> None:
    bm = BlockManager(4, 4)
    a = seq(0, range(10))
    compute(bm, a, 10)
    assert a.block_table == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 0]
    b = seq(1, range(100, 108))
    assert not bm.allocate_slots(b, 8)  # needs 2, one is free
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_prefix_hit_shares_blocks_and_leaves_the_last_token() -> None:
    bm = BlockManager(8, 4)
    a = seq(0, range(12))
    compute(bm, a, 12)
    b = seq(1, list(range(8)) + [50, 51, 52])
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2]
    compute(bm, b, 3, hits)
    assert b.block_table[:2] == [0, 1] and bm.blocks[0].ref_count == 2
    # A prompt cached in full still recomputes its last token: the last block is not a hit.
    c = seq(2, range(12))
    assert bm.get_computed_blocks(c) == [0, 1]


def test_free_keeps_hashes_and_evicts_lru_tail_first() -> None:
    bm = BlockManager(4, 2)
    a = seq(0, range(6))
    compute(bm, a, 6)  # blocks 0, 1, 2 all full and hashed
    bm.free(a)
    assert list(bm.free_queue) == [3, 2, 1, 0]  # never-hashed 3 first, then the chain from its tail
    b = seq(1, [9, 9, 9])
    compute(bm, b, 3)
    assert b.block_table == [3, 2]  # evicted 3, then the tail of a's chain
    c = seq(2, list(range(4)) + [7])
    assert bm.get_computed_blocks(c) == [0, 1]  # the shared head survived


def test_cached_free_block_is_revived_with_its_ref_count() -> None:
    bm = BlockManager(4, 2)
    a = seq(0, range(5))
    compute(bm, a, 5)
    bm.free(a)
    b = seq(1, range(5))
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    assert bm.allocate_slots(b, 1, hits)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 1
    bm.free(b)
    assert bm.num_free_blocks == 4 and all(x.ref_count == 0 for x in bm.blocks)


def test_prefix_caching_off_finds_nothing() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    a = seq(0, range(5))
    compute(bm, a, 5)
    assert bm.get_computed_blocks(seq(1, range(5))) == []


def test_reset_prefix_cache_forgets_only_free_blocks() -> None:
    bm = BlockManager(8, 4)
    held, gone = seq(0, range(9)), seq(1, range(100, 109))
    compute(bm, held, 9)
    compute(bm, gone, 9)
    bm.free(gone)
    bm.reset_prefix_cache()
    assert bm.get_computed_blocks(seq(2, range(100, 109))) == []
    assert bm.get_computed_blocks(seq(3, range(9))) == held.block_table[:2]
    assert bm.num_free_blocks == 8 - 3
