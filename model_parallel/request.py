"""What a request asks for (SamplingParams), how its sequences stand, and what it gets back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from model_parallel.structured import StructuredOutputSpec

if TYPE_CHECKING:
    import xgrammar as xgr

MAX_LOGPROBS = 20


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: the chosen token plus k top alternatives
    skip_special_tokens: bool = True
    structured: StructuredOutputSpec | None = None  # the grammar the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        _check(self.n >= 1, "n", ">= 1", self.n)
        _check(0.0 <= self.temperature <= 2.0, "temperature", "in [0, 2]", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(self.top_k >= 0, "top_k", "-1, 0 (off) or a positive count", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _check(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            "in [-2, 2]",
            self.presence_penalty,
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            "in [-2, 2]",
            self.frequency_penalty,
        )
        _check(
            0.0 < self.repetition_penalty <= 2.0,
            "repetition_penalty",
            "in (0, 2]",
            self.repetition_penalty,
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens
        )
        _check(self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            "<= max_tokens",
            self.min_tokens,
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"in [0, {MAX_LOGPROBS}]",
            self.logprobs,
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "a list of non-empty strings",
            self.stop,
        )
        for token, bias in (self.logit_bias or {}).items():
            _check(-100.0 <= bias <= 100.0, f"logit_bias[{token}]", "in [-100, 100]", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Logprob(NamedTuple):
    token_id: int
    logprob: float


class TokenLogprobs(NamedTuple):
    """The chosen token's logprob and the top alternatives at one position."""

    chosen: Logprob
    top: list[Logprob]


@dataclass(slots=True, eq=False)
class Sequence:
    """One sampled completion: the unit the scheduler batches. A request owns n of them."""

    seq_id: int
    request_id: str
    index: int  # the choice index inside its request
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None  # seeded requests draw from their own stream
    grammar: xgr.GrammarMatcher | None = None  # where a structured request stands in its grammar

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def step_generator(self) -> torch.Generator | None:
        """A seeded sequence's random stream for its next token, derived from (seed, choice,
        position) alone: a request continued elsewhere draws what it would have drawn here."""
        if self.generator is None:
            return None
        key = hash((self.params.seed, self.index, self.num_output_tokens)) & ((1 << 63) - 1)
        return self.generator.manual_seed(key)


@dataclass(slots=True)
class CompletionOutput:
    """What one choice gained in a step: new text and tokens, and a finish reason once it ends."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int  # across all choices so far
    finished: bool
    error: str | None = None  # refused after it was queued (its grammar did not compile)


def coalesce(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One output carrying what `a` then `b` carried: fewer, larger items for a slow consumer."""
    by_index = {c.index: c for c in a.outputs}
    merged = list(a.outputs)
    for c in b.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            merged.append(c)
            by_index[c.index] = c
            continue
        logprobs = None if prev.logprobs is None else prev.logprobs + (c.logprobs or [])
        joined = CompletionOutput(
            c.index,
            prev.text + c.text,
            prev.token_ids + c.token_ids,
            logprobs,
            c.finish_reason,
            c.stop_reason,
        )
        merged[merged.index(prev)] = joined
        by_index[c.index] = joined
    return RequestOutput(
        b.request_id,
        merged,
        b.num_prompt_tokens,
        b.num_cached_tokens,
        b.num_output_tokens,
        b.finished,
    )
