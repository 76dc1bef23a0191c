"""Continuous batching on a block pool: budgets, chunked prefill, admission and preemption."""

from __future__ import annotations

from model_parallel.block_manager import BlockManager
from model_parallel.config import SchedulerConfig
from model_parallel.request import SequenceStatus
from model_parallel.scheduler import Scheduler
from tests.model_parallel.test_block_manager import seq


def step(sched, sampled: int = 7) -> list[tuple[int, int]]:
    """One step with a fake model: every sequence that reaches its end gets `sampled` appended."""
    out = sched.schedule()
    ends = [s.seq for s in out.scheduled if s.samples]
    sched.update(out)
    for s in ends:
        s.token_ids.append(sampled)
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


def test_budget_chunks_long_prompts_and_mixes_decodes() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(32, 4))
    a, b = seq(0, range(3)), seq(1, range(100, 120))
    sched.add(a)
    assert step(sched) == [(0, 3)]
    sched.add(b)
    assert step(sched) == [(0, 1), (1, 7)]  # a decodes, b's prefill gets the rest of the budget
    assert step(sched) == [(0, 1), (1, 7)]
    assert step(sched) == [(0, 1), (1, 6)]
    assert b.num_computed_tokens == 20 and b.num_tokens == 21


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(32, 4))
    for i in range(3):
        sched.add(seq(i, [i, i]))
    assert [sid for sid, _ in step(sched)] == [0, 1]
    assert len(sched.waiting) == 1


def test_newest_is_preempted_and_resumes_from_scratch() -> None:
    sched = Scheduler(SchedulerConfig(), BlockManager(3, 2))
    a, b = seq(0, [1, 2, 3]), seq(1, [4])
    sched.add(a), sched.add(b)
    assert step(sched) == [(0, 3), (1, 1)]  # a: 2 blocks, b: 1 block; pool is full
    assert step(sched) == [(0, 1), (1, 1)]  # both still fit their blocks
    assert b.status is SequenceStatus.RUNNING
    out = sched.schedule()  # a needs a third block: b, the newest, makes room
    assert [s.seq.seq_id for s in out.scheduled] == [0] and out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and sched.waiting[0] is b


def test_finish_frees_blocks_wherever_the_sequence_is() -> None:
    bm = BlockManager(8, 2)
    sched = Scheduler(SchedulerConfig(), bm)
    a, b = seq(0, [1, 2, 3]), seq(1, [4, 5])
    sched.add(a)
    step(sched)
    sched.add(b)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert not sched.has_unfinished() and bm.num_free_blocks == 8
