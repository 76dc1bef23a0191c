"""The ingress side of a streaming DeploymentHandle call: the first item decides between an error
status, JSON and SSE; the SSE body follows; a client that leaves cancels the engine request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from model_parallel.request import RequestOutput
from serving.protocol import OpenAIError

RETRY_AFTER_S = "1"


def cause_of(e: BaseException) -> BaseException:
    """The exception an LLMServer call raised, out of Ray's task-error wrapper."""
    return e.cause if isinstance(e, RayTaskError) and e.cause is not None else e


def to_openai_error(e: BaseException) -> OpenAIError:
    """What an exception from the LLMServer call means for the client."""
    cause = cause_of(e)
    if isinstance(cause, OpenAIError):
        return cause
    if isinstance(cause, ValueError):  # the engine refused the request
        return OpenAIError(str(cause))
    if isinstance(cause, BackPressureError):
        return OpenAIError(
            "the server is at capacity; retry shortly",
            503,
            type="server_overloaded",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    if isinstance(cause, (RayActorError, RuntimeError)):
        return OpenAIError(
            f"the model replica failed: {cause}"[:1000],
            503,
            type="service_unavailable",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    return OpenAIError(f"internal error: {cause!r}"[:1000], 500, type="internal_error")


async def first_output(stream: Any) -> RequestOutput:
    """The first item, or the error that takes its place, before any byte is sent."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration as e:
        raise OpenAIError("the engine returned nothing", 500, type="internal_error") from e
    except Exception as e:  # noqa: BLE001
        raise to_openai_error(e) from e


async def prepend(
    first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    yield first
    async for out in rest:
        yield out


def _data(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def _sse(
    items: AsyncIterator[dict[str, Any]],
    stream: Any,
    line: Callable[[dict[str, Any]], str],
    error_line: Callable[[OpenAIError], str],
    tail: str,
) -> AsyncIterator[str]:
    """A failure mid-stream becomes an error event; leaving early (the client disconnected)
    cancels the engine request, which frees its blocks."""
    done = False
    try:
        async for item in items:
            yield line(item)
        done = True
    except Exception as e:  # noqa: BLE001
        yield error_line(to_openai_error(e))
        done = True
    finally:
        if not done:
            stream.cancel()
    if tail:
        yield tail


def sse(chunks: AsyncIterator[dict[str, Any]], stream: Any) -> AsyncIterator[str]:
    """Server-sent events as chat and completions stream them: data lines, then [DONE]."""
    return _sse(
        chunks,
        stream,
        lambda chunk: f"data: {_data(chunk)}\n\n",
        lambda error: f"data: {_data(error.body())}\n\n",
        "data: [DONE]\n\n",
    )


def named_sse(events: AsyncIterator[dict[str, Any]], stream: Any) -> AsyncIterator[str]:
    """Server-sent events as the Responses API streams them: each named by its type, an `error`
    event for a failure, no [DONE]."""

    def error_line(e: OpenAIError) -> str:
        body = {"type": "error", "code": e.code, "message": e.message, "param": e.param}
        return f"event: error\ndata: {_data(body)}\n\n"

    return _sse(
        events, stream, lambda ev: f"event: {ev['type']}\ndata: {_data(ev)}\n\n", error_line, ""
    )
