"""LLMServer's --stream-interval: which engine outputs are merged before they cross Serve."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from model_parallel.request import CompletionOutput, RequestOutput
from serving.config import ModelDeployment
from serving.llm_server import every_n_tokens


def step(i: int, tokens: list[int], finished: bool = False) -> RequestOutput:
    """One engine step of a request with two choices, the second a token behind the first."""
    choices = [CompletionOutput(0, f"<{i}>", tokens, None, "length" if finished else None)]
    if i > 0:
        choices.append(CompletionOutput(1, f"[{i}]", tokens, None))
    return RequestOutput("r", choices, 5, 0, 2 * i + 1, finished)


async def collect(outputs: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in outputs]


def test_first_output_at_once_then_every_n_tokens_then_the_last() -> None:
    async def engine() -> AsyncIterator[RequestOutput]:
        yield step(0, [10])
        yield step(1, [11, 12])  # the front end had already merged two steps
        for i in range(2, 7):
            yield step(i, [10 + i], finished=i == 6)

    items = asyncio.run(collect(every_n_tokens(engine(), 3)))
    assert [o.outputs[0].text for o in items] == ["<0>", "<1><2>", "<3><4><5>", "<6>"]
    assert [o.outputs[0].token_ids for o in items] == [[10], [11, 12, 12], [13, 14, 15], [16]]
    assert [o.outputs[1].text for o in items[1:]] == ["[1][2]", "[3][4][5]", "[6]"]
    assert [o.finished for o in items] == [False, False, False, True]
    assert items[-1].outputs[0].finish_reason == "length"
    assert items[-1].num_output_tokens == 13


def test_interval_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        ModelDeployment(stream_interval=0)
