"""Continuous batching without phases: every running sequence catches its num_computed_tokens up to
its num_tokens, and a step hands out a token budget. Decodes, chunked prefills and arrivals share
a batch; when blocks run out, the newest running sequence is preempted and recomputed later."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from model_parallel.block_manager import BlockManager
from model_parallel.config import SchedulerConfig
from model_parallel.request import Sequence, SequenceStatus


class ScheduledSequence(NamedTuple):
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the last known token, so this step samples the next one.
        NOTE: read it before Scheduler.update, which advances num_computed_tokens."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, n, out):
                break
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            i += 1
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt from the newest end until `seq` fits; False if `seq` itself had to go."""
        while not self.block_manager.allocate_slots(seq, n):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            computed = bm.get_computed_blocks(seq)
            num_cached = len(computed) * bm.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate_slots(seq, n, computed):
                break
            if seq.num_output_tokens == 0 and seq.num_cached_tokens == 0:
                seq.num_cached_tokens = num_cached
                self.prefix_queried_tokens += seq.num_tokens
                self.prefix_hit_tokens += num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput) -> None:
        """Credit the computed tokens and publish newly full blocks to the prefix cache."""
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out (done or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
