"""POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API over the chat path.
A request becomes chat messages (instructions, the stored conversation of previous_response_id,
then its input items), tools and a response format, and goes through the same checks, template,
tool plan and engine as /v1/chat/completions; the output is built by ResponseBuilder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.api.chat import prepare
from serving.frontend import Frontend, validate
from serving.protocol import (
    ChatCompletionRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    OpenAIError,
    ResponsesRequest,
)
from serving.response_store import ResponseStore, StoredResponse
from serving.response_view import ResponseBuilder, new_id, output_messages
from serving.streams import first_output, named_sse, prepend


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The input items as chat messages: calls join the assistant turn before them."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict[str, Any]] = []
    for item in req.input:
        if isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        else:
            messages.append({"role": item.role, "content": item.text()})
    return messages


def chat_tools(req: ResponsesRequest) -> dict[str, Any]:
    """Responses' flat function tools and tool_choice in chat's nested shape."""
    body: dict[str, Any] = {}
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") != "function":
                raise OpenAIError("only function tools are supported", param=f"tools.{i}.type")
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            tools.append({"type": "function", "function": fn})
        body["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise OpenAIError(
                'a named tool_choice is {"type": "function", "name": ...}', param="tool_choice"
            )
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        body["tool_choice"] = choice
    return body


def response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    """text.format as chat's response_format (its json_schema fields sit one level up)."""
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


class ResponsesHandler:
    def __init__(self, front: Frontend):
        self.front = front
        self.store = ResponseStore()

    async def get(self, request: Request, response_id: str) -> Response:
        self.front.authorize(request)
        stored = self.store.get(response_id)
        if stored is None:
            raise OpenAIError(f"no response with id {response_id!r}", 404, param="response_id")
        return JSONResponse(stored.response)

    def _history(self, req: ResponsesRequest) -> list[dict[str, Any]]:
        if req.previous_response_id is None:
            return []
        stored = self.store.get(req.previous_response_id)
        if stored is None:
            raise OpenAIError(
                f"no stored response with id {req.previous_response_id!r} (responses are kept "
                "for a bounded time by the server replica that made them)",
                param="previous_response_id",
            )
        return stored.messages

    async def create(self, request: Request) -> Response:
        req: ResponsesRequest = await self.front.parse(request, ResponsesRequest)
        conversation = self._history(req) + input_messages(req)
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        body = {
            "model": req.model,
            "messages": system + conversation,
            "parallel_tool_calls": req.parallel_tool_calls,
            **{
                k: getattr(req, k)
                for k in ("temperature", "top_p", "seed", "user")
                if k in req.model_fields_set
            },
            **chat_tools(req),
        }
        if req.max_output_tokens is not None:
            body["max_completion_tokens"] = req.max_output_tokens
        if (fmt := response_format(req)) is not None:
            body["response_format"] = fmt
        chat: ChatCompletionRequest = validate(ChatCompletionRequest, body)
        job = await prepare(self.front, chat, "text.format")
        rid = new_id("resp")
        stream = self.front.open_stream(job.entry, rid, job.prompt, job.params)
        first = await first_output(stream)
        builder = ResponseBuilder(rid, self._echo(req, job.params), job.plan)

        def keep() -> None:
            if req.store:
                messages = conversation + output_messages(builder.output)
                self.store.put(rid, StoredResponse(builder.response(), messages))

        if req.stream:
            events = self._events(builder, prepend(first, stream), keep)
            return StreamingResponse(named_sse(events, stream), media_type="text/event-stream")
        async for out in prepend(first, stream):
            builder.feed(out)
        keep()
        return JSONResponse(builder.response())

    @staticmethod
    async def _events(
        builder: ResponseBuilder, outputs: AsyncIterator[Any], keep: Callable[[], None]
    ) -> AsyncIterator[dict[str, Any]]:
        for event in builder.start():
            yield event
        async for out in outputs:
            for event in builder.feed(out):
                yield event
        keep()

    @staticmethod
    def _echo(req: ResponsesRequest, params: Any) -> dict[str, Any]:
        """The request fields a response repeats, with the sampling values it ran with."""
        fmt = req.text.format if req.text and req.text.format else {"type": "text"}
        return {
            "model": req.model,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "text": {"format": fmt},
            "tool_choice": req.tool_choice or ("auto" if req.tools else "none"),
            "tools": req.tools or [],
            "truncation": "disabled",
            "user": req.user,
            "metadata": req.metadata or {},
        }
