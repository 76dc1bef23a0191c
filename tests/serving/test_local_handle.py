"""Direct streaming's pieces: LocalHandle (the replica's own LLMServer behind a DeploymentHandle's
call syntax, so the API modules and ResumableStream run unchanged over it) and Admission (the
queue limit that Serve kept in front of LLMServer)."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve.exceptions import BackPressureError

from serving.llm_server import Admission
from serving.local_handle import LocalHandle


class Server:
    def __init__(self) -> None:
        self.closed = False

    def info(self) -> dict[str, int]:
        return {"max_model_len": 8}

    async def generate(self, n: int):  # noqa: ANN201
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0)
        finally:
            self.closed = True


def test_calls_and_streams_look_like_a_deployment_handle() -> None:
    async def run() -> None:
        server = Server()
        handle = LocalHandle(server)
        assert await handle.info.remote() == {"max_model_len": 8}
        stream = handle.options(stream=True).generate.remote(3)
        assert [i async for i in stream] == [0, 1, 2] and server.closed

    asyncio.run(run())


def test_cancel_closes_the_generator_so_the_request_is_aborted() -> None:
    async def run() -> None:
        server = Server()
        stream = LocalHandle(server).options(stream=True).generate.remote(100)
        assert await stream.__anext__() == 0
        stream.cancel()
        await asyncio.sleep(0.01)
        assert server.closed

    asyncio.run(run())


def test_admission_refuses_past_the_limit_and_counts_finished_streams_out() -> None:
    async def admit(admission: Admission, n: int):  # noqa: ANN202 - LLMServer.generate's shape
        with admission:
            async for i in Server().generate(n):
                yield i

    async def run() -> None:
        admission = Admission(2)
        held = [admit(admission, 5) for _ in range(2)]
        assert [await s.__anext__() for s in held] == [0, 0] and admission.ongoing == 2
        with pytest.raises(BackPressureError):
            await admit(admission, 5).__anext__()
        await held[0].aclose()
        assert admission.ongoing == 1
        assert [i async for i in admit(admission, 2)] == [0, 1]
        assert admission.ongoing == 1

    asyncio.run(run())
