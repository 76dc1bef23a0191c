"""A deployment's methods called in this process, the way the API modules call a
DeploymentHandle (`handle.options(stream=True).generate.remote(...)`, `handle.info.remote()`):
direct streaming's replica hands its own LLMServer to the ingress code this way."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from model_parallel.request import RequestOutput


class LocalStream:
    """A local async generator, consumed as a streaming DeploymentResponseGenerator is."""

    def __init__(self, gen: AsyncIterator[RequestOutput]):
        self._gen = gen

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> RequestOutput:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        """Closing the generator runs LLMServer.generate's cleanup, which aborts the request."""
        asyncio.ensure_future(self._gen.aclose())


class _LocalMethod:
    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        result = self._fn(*args)
        if inspect.isasyncgen(result):
            return LocalStream(result)
        return result if inspect.isawaitable(result) else _ready(result)


async def _ready(value: Any) -> Any:
    return value


class LocalHandle:
    """An object in this process behind a DeploymentHandle's call syntax. A stream through it
    cannot go on elsewhere when this replica dies (see ResumableStream)."""

    def __init__(self, server: object):
        self._server = server

    def options(self, **_: Any) -> LocalHandle:
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._server, name))
