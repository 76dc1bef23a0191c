"""POST /v1/completions: one prompt or many (strings or token ids), echo, logprobs, streamed or not.
Each prompt is one engine request; choice i*n + j is prompt i's j-th completion."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model_parallel.request import RequestOutput
from serving.chat import merge_choice, sampling_params, usage
from serving.frontend import Frontend, ModelEntry
from serving.protocol import CompletionRequest, OpenAIError
from serving.streams import first_output, prepend, sse
from serving.structured_outputs import requested_guide


def prompt_ids(
    tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise OpenAIError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


class CompletionsHandler:
    def __init__(self, front: Frontend):
        self.front = front

    async def handle(self, request: Request) -> Response:
        front = self.front
        req: CompletionRequest = await front.parse(request, CompletionRequest)
        entry = front.model(req.model)
        if req.suffix is not None:
            raise OpenAIError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError("best_of other than n is not supported", param="best_of")
        if req.echo and req.logprobs is not None:
            raise OpenAIError("echo with logprobs is not supported", param="echo")
        if req.n > front.settings.max_n:
            raise OpenAIError(f"n must be in [1, {front.settings.max_n}]", param="n")
        prompts = prompt_ids(entry.tokenizer, req.prompt)
        if len(prompts) * req.n > 4 * front.settings.max_n:
            raise OpenAIError("too many prompts in one request", param="prompt")
        vocab = len(entry.tokenizer)
        for p in prompts:
            if not p or any(not 0 <= t < vocab for t in p):
                raise OpenAIError(
                    f"prompt token ids must be in [0, {vocab}) and non-empty", param="prompt"
                )
            await front.check_prompt(entry, p, "prompt")
        guide = None
        if (asked := requested_guide(req)) is not None:
            param, guide = asked
            await front.check_guide(guide, param)
        params = sampling_params(req, req.max_tokens, req.logprobs, guide, entry.defaults)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = [front.open_stream(entry, f"{rid}-{i}", p, params) for i, p in enumerate(prompts)]
        firsts = [await first_output(s) for s in streams]
        view = CompletionView(rid, req, entry, prompts)
        if req.stream:
            merged = _merge([prepend(f, s) for f, s in zip(firsts, streams)])
            return StreamingResponse(
                sse(view.chunks(merged), _Cancel(streams)), media_type="text/event-stream"
            )
        outs = [[f] + [o async for o in s] for f, s in zip(firsts, streams)]
        return JSONResponse(view.response(outs))


class _Cancel:
    def __init__(self, streams: list[Any]):
        self.streams = streams

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()


async def _merge(
    gens: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several prompts' streams as their items arrive, tagged with the prompt index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - re-raised on the consumer side
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    live = len(tasks)
    try:
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class CompletionView:
    def __init__(
        self, rid: str, req: CompletionRequest, entry: ModelEntry, prompts: list[list[int]]
    ):
        self.rid, self.req, self.entry = rid, req, entry
        self.created = int(time.time())
        self.echo = [entry.tokenizer.decode(p) if req.echo else "" for p in prompts]

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.req.model}

    def response(self, outs: list[list[RequestOutput]]) -> dict[str, Any]:
        choices = []
        prompt_tokens = completion_tokens = cached = 0
        for i, outputs in enumerate(outs):
            acc: dict[int, dict[str, Any]] = {}
            for out in outputs:
                for c in out.outputs:
                    merge_choice(acc, c)
            last = outputs[-1]
            prompt_tokens += last.num_prompt_tokens
            completion_tokens += last.num_output_tokens
            cached += last.num_cached_tokens
            for j, e in sorted(acc.items()):
                lp = (
                    self.entry.logprobs.completion(e["logprobs"], 0)
                    if self.req.logprobs is not None
                    else None
                )
                choices.append(
                    {
                        "index": i * self.req.n + j,
                        "text": self.echo[i] + "".join(e["text"]),
                        "logprobs": lp,
                        "finish_reason": e["finish_reason"],
                        "stop_reason": e.get("stop_reason"),
                    }
                )
        return {
            **self._base("text_completion"),
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, cached),
        }

    async def chunks(
        self, merged: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[dict[str, Any]]:
        lasts: dict[int, RequestOutput] = {}
        echoed: set[tuple[int, int]] = set()
        offsets: dict[tuple[int, int], int] = {}
        async for i, out in merged:
            lasts[i] = out
            for c in out.outputs:  # one choice per chunk, as OpenAI sends them
                key = (i, c.index)
                text = c.text
                if key not in echoed:
                    echoed.add(key)
                    text = self.echo[i] + text
                lp = None
                if self.req.logprobs is not None and c.logprobs:
                    lp = self.entry.logprobs.completion(c.logprobs, offsets.get(key, 0))
                offsets[key] = offsets.get(key, 0) + len(c.text)
                choice = {
                    "index": i * self.req.n + c.index,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                }
                yield {**self._base("text_completion"), "choices": [choice]}
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield {
                **self._base("text_completion"),
                "choices": [],
                "usage": usage(
                    sum(o.num_prompt_tokens for o in lasts.values()),
                    sum(o.num_output_tokens for o in lasts.values()),
                    sum(o.num_cached_tokens for o in lasts.values()),
                ),
            }
