"""POST /v1/chat/completions: a chat request -> its prompt, tool plan and SamplingParams (shared
with the Responses API, which speaks the same chat underneath), streamed or whole."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model_parallel.request import SamplingParams
from serving.chat import check_supported, render_chat, sampling_params
from serving.chat_view import ChatView
from serving.frontend import Frontend, ModelEntry
from serving.protocol import ChatCompletionRequest, OpenAIError
from serving.streams import first_output, sse
from serving.structured_outputs import requested_guide
from serving.tool_calls import ToolPlan, plan_tools


@dataclass(frozen=True, slots=True)
class ChatJob:
    """A checked chat request, ready for the engine."""

    entry: ModelEntry
    prompt: list[int]
    params: SamplingParams
    plan: ToolPlan


async def prepare(front: Frontend, req: ChatCompletionRequest, format_param: str) -> ChatJob:
    """Every check a chat makes before the engine sees it (400s name the field; a structured
    output's field is `format_param`), then the rendered prompt and the sampling params."""
    entry = front.model(req.model)
    check_supported(req, front.settings.allow_request_chat_template)
    if req.n > front.settings.max_n:
        raise OpenAIError(f"n must be in [1, {front.settings.max_n}]", param="n")
    if req.top_logprobs and not req.logprobs:
        raise OpenAIError("top_logprobs requires logprobs=true", param="top_logprobs")
    plan = plan_tools(req)
    asked = requested_guide(req, req.response_format, format_param)
    if asked is not None and plan.parses_calls:
        raise OpenAIError(
            "a structured output cannot be combined with tool calls (set tool_choice 'none')",
            param=asked[0],
        )
    guide = plan.guide()  # plan_tools checked each function's schema
    if asked is not None:
        param, guide = asked
        await front.check_guide(guide, param)
    prompt = await front.bounded(
        render_chat, entry.tokenizer, req, plan, what="the chat template", param="messages"
    )
    await front.check_prompt(entry, prompt, "messages")
    params = sampling_params(
        req,
        req.max_completion_tokens or req.max_tokens,
        (req.top_logprobs or 0) if req.logprobs else None,
        guide,
        entry.defaults,
    )
    return ChatJob(entry, prompt, params, plan)


class ChatHandler:
    def __init__(self, front: Frontend):
        self.front = front

    async def handle(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self.front.parse(request, ChatCompletionRequest)
        job = await prepare(self.front, req, "response_format")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self.front.open_stream(job.entry, rid, job.prompt, job.params)
        first = await first_output(stream)
        view = ChatView(rid, req, job.entry.logprobs, job.plan)
        if req.stream:
            return StreamingResponse(
                sse(view.chunks(first, stream), stream), media_type="text/event-stream"
            )
        outputs = [first] + [o async for o in stream]
        return JSONResponse(view.response(outputs))
