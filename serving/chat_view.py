"""Engine outputs -> OpenAI chat.completion and chat.completion.chunk dicts, with tool calls
parsed out of each choice's text."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from model_parallel.request import CompletionOutput, RequestOutput
from serving.chat import LogprobFormatter, merge_choice, usage
from serving.protocol import ChatCompletionRequest
from serving.streams import prepend
from serving.tool_calls import ParsedCall, ToolCallParser, ToolPlan


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(c: ParsedCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def finish_reason(reason: str | None, parser: ToolCallParser | None) -> str | None:
    return "tool_calls" if reason == "stop" and parser is not None and parser.calls else reason


class ChatView:
    """Engine outputs -> chat.completion or chat.completion.chunk dicts for one request; with
    tools, each choice's text goes through a ToolCallParser (the same one whole and streamed)."""

    def __init__(self, rid: str, req: ChatCompletionRequest, fmt: LogprobFormatter, plan: ToolPlan):
        self.rid, self.req, self.fmt, self.plan = rid, req, fmt, plan
        self.created = int(time.time())
        self.parsers: dict[int, ToolCallParser] = {}

    def _parser(self, index: int) -> ToolCallParser | None:
        if not self.plan.parses_calls:
            return None
        return self.parsers.setdefault(index, ToolCallParser(new_call_id))

    def _logprobs(self, lps: list | None) -> dict[str, Any] | None:
        return {"content": self.fmt.chat(lps or [])} if self.req.logprobs else None

    def _message(self, index: int, text: str) -> dict[str, Any]:
        parser = self._parser(index)
        if parser is None:
            return {"role": "assistant", "content": text}
        content = parser.feed(text, final=True).content
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if parser.calls:
            message["tool_calls"] = [tool_call(c) for c in parser.calls]
        return message

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        acc: dict[int, dict[str, Any]] = {}
        for out in outputs:
            for c in out.outputs:
                merge_choice(acc, c)
        last = outputs[-1]
        choices = [
            {
                "index": i,
                "message": self._message(i, "".join(e["text"])),
                "logprobs": self._logprobs(e["logprobs"]),
                "finish_reason": finish_reason(e["finish_reason"], self.parsers.get(i)),
                "stop_reason": e.get("stop_reason"),
            }
            for i, e in sorted(acc.items())
        ]
        return {
            "id": self.rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
            "usage": usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens),
        }

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        usage_field = {"usage": None} if self._include_usage else {}
        return {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
            **usage_field,
            **extra,
        }

    @property
    def _include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def _delta(self, c: CompletionOutput) -> dict[str, Any]:
        parser = self._parser(c.index)
        if parser is None:
            return {"content": c.text} if c.text else {}
        ev = parser.feed(c.text, final=c.finish_reason is not None)
        delta: dict[str, Any] = {"content": ev.content} if ev.content else {}
        if ev.calls:  # each call whole, in one piece: see ToolCallParser
            delta["tool_calls"] = [{"index": k, **tool_call(parser.calls[k])} for k in ev.calls]
        return delta

    async def chunks(
        self, first: RequestOutput, rest: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[dict[str, Any]]:
        # One choice per chunk, as OpenAI and vLLM send them: clients read choices[0].
        for i in range(self.req.n):
            yield self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        last = first
        async for out in prepend(first, rest):
            last = out
            for c in last.outputs:
                delta = self._delta(c)
                if delta or c.finish_reason or c.logprobs:
                    yield self._chunk(
                        [
                            {
                                "index": c.index,
                                "delta": delta,
                                "logprobs": self._logprobs(c.logprobs) if c.logprobs else None,
                                "finish_reason": finish_reason(
                                    c.finish_reason, self.parsers.get(c.index)
                                ),
                            }
                        ]
                    )
        if self._include_usage:
            yield {
                **self._chunk([]),
                "usage": usage(
                    last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens
                ),
            }
