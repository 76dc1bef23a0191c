"""ResumableStream against a scripted handle (the two-node tests kill real replicas): what is
resubmitted after a replica dies, and what is not resumed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from model_parallel.request import CompletionOutput, RequestOutput, SamplingParams
from serving import resumable
from serving.resumable import ResumableStream


def out(tokens: list[int], finished: bool = False, cached: int = 0) -> RequestOutput:
    c = CompletionOutput(0, "x" * len(tokens), tokens, None, "length" if finished else None)
    return RequestOutput("r", [c], 5, cached, 0, finished)


class ScriptedHandle:
    """Each call streams its script; an exception in a script is raised at that point."""

    def __init__(self, *scripts: list[Any]):
        self.scripts = list(scripts)
        self.calls: list[tuple] = []

    def options(self, stream: bool) -> ScriptedHandle:
        return self

    @property
    def generate(self) -> ScriptedHandle:
        return self

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        script = self.scripts.pop(0)

        async def stream() -> Any:
            for item in script:
                if isinstance(item, BaseException):
                    raise item
                yield item

        return stream()


async def collect_outputs(stream: ResumableStream) -> list[RequestOutput]:
    return [o async for o in stream]


async def collect(stream: ResumableStream) -> list[int]:
    return [t for o in await collect_outputs(stream) for t in o.outputs[0].token_ids]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resumable, "RESUME_BACKOFF_S", 0.0)


def test_a_lost_replica_is_resumed_from_the_tokens_sent() -> None:
    handle = ScriptedHandle(
        [out([1, 2], cached=16), out([3], cached=16), ActorDiedError()],
        [ActorDiedError()],  # routed to the dead replica once more
        [out([4]), out([5], finished=True)],
    )
    resumed = []
    stream = ResumableStream(handle, "r", [9, 9], SamplingParams(), lambda: resumed.append(1))
    outs = asyncio.run(collect_outputs(stream))
    assert [t for o in outs for t in o.outputs[0].token_ids] == [1, 2, 3, 4, 5]
    assert all(o.num_cached_tokens == 16 for o in outs)  # as the client's request began
    assert [c[3] for c in handle.calls] == [None, [1, 2, 3], [1, 2, 3]]
    assert [c[0] for c in handle.calls] == ["r", "r-1", "r-2"] and len(resumed) == 2


def test_request_errors_and_n_above_one_are_not_resumed() -> None:
    handle = ScriptedHandle([out([1]), ValueError("bad")])
    with pytest.raises(ValueError):
        asyncio.run(collect(ResumableStream(handle, "r", [9], SamplingParams())))
    handle = ScriptedHandle([out([1]), ActorDiedError()])
    with pytest.raises(ActorDiedError):
        asyncio.run(collect(ResumableStream(handle, "r", [9], SamplingParams(n=2))))
    assert len(handle.calls) == 1


def test_resumes_are_bounded() -> None:
    handle = ScriptedHandle(*[[ActorDiedError()]] * 6)
    with pytest.raises(ActorDiedError):
        asyncio.run(collect(ResumableStream(handle, "r", [9], SamplingParams())))
    assert len(handle.calls) == 1 + resumable.MAX_RESUMES
