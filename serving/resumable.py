"""A request's LLMServer stream that outlives its replica.

When the replica dies mid-request (its process killed, its node lost, its engine dead), the ingress
sends the request to another replica as a continuation: the prompt plus the tokens the client
already has; the engine counts them as output, so max_tokens, penalties, stops, grammars and the
seeded random stream go on where they were, and the client sees neither an error nor a repeated
token. Requests with n > 1 are not continued (their error reaches the client as before).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError, WorkerCrashedError

from model_parallel.engine import EngineDeadError
from model_parallel.request import RequestOutput, SamplingParams
from serving.streams import cause_of

logger = logging.getLogger(__name__)

# Serve's router may still pick the dead replica until it learns of the death: back off 0.25 s,
# doubling, for up to 5 tries (about 8 s in all).
MAX_RESUMES = 5
RESUME_BACKOFF_S = 0.25


def replica_lost(e: BaseException) -> bool:
    """The error says the replica (not the request) failed."""
    return isinstance(cause_of(e), (RayActorError, WorkerCrashedError, EngineDeadError))


class ResumableStream:
    """Async iterator of one request's RequestOutputs, resubmitted on replica loss."""

    def __init__(
        self,
        handle: Any,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        on_resume: Callable[[], object] = lambda: None,
        max_resumes: int = MAX_RESUMES,
    ):
        self.handle = handle
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.on_resume = on_resume
        self.max_resumes = max_resumes if params.n == 1 else 0
        self.attempt = 0  # resubmissions so far
        self.sent: list[int] = []  # output tokens received so far
        self.cached = 0  # prompt tokens the first replica found in its prefix cache
        self._stream = self._submit()

    def _submit(self) -> Any:
        rid = self.request_id if self.attempt == 0 else f"{self.request_id}-{self.attempt}"
        call = self.handle.options(stream=True).generate
        return call.remote(rid, self.prompt_token_ids, self.params, list(self.sent) or None)

    def __aiter__(self) -> ResumableStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            try:
                out: RequestOutput = await self._stream.__anext__()
            except Exception as e:  # noqa: BLE001 - the end (StopAsyncIteration) is re-raised
                if not replica_lost(e) or self.attempt == self.max_resumes:
                    raise
                self.attempt += 1
                logger.warning(
                    "request %s: replica lost after %d tokens (%r); continuing elsewhere",
                    self.request_id,
                    len(self.sent),
                    e,
                )
                self.on_resume()
                await asyncio.sleep(RESUME_BACKOFF_S * 2 ** (self.attempt - 1))
                self._stream = self._submit()
                continue
            if self.attempt == 0:
                self.cached = out.num_cached_tokens
            else:  # usage reports the prefix-cache hits of the request as the client began it
                out.num_cached_tokens = self.cached
            for c in out.outputs:
                self.sent += c.token_ids
            return out

    def cancel(self) -> None:
        self._stream.cancel()
