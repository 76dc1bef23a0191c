"""Engine outputs -> a Responses API response and its stream of events, in OpenAI's order:

    response.created, response.in_progress,
    per message: output_item.added, content_part.added, output_text.delta ..., output_text.done,
                 content_part.done, output_item.done
    per call:    output_item.added, function_call_arguments.delta, function_call_arguments.done,
                 output_item.done
    response.completed (or response.incomplete when max_output_tokens ended it)

The whole response is built by the same events, so both always carry the same output; a call
comes once it is complete (see ToolCallParser), and one cut off by max_output_tokens in neither."""

from __future__ import annotations

import time
import uuid
from typing import Any

from model_parallel.request import RequestOutput
from serving.chat_view import new_call_id
from serving.tool_calls import ParsedCall, ToolCallParser, ToolPlan

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """One response's output items, built from its engine outputs; `feed` returns the events
    each output adds."""

    def __init__(self, rid: str, echo: dict[str, Any], plan: ToolPlan):
        self.rid, self.echo = rid, echo  # echo: the request fields a response repeats
        self.parser = ToolCallParser(new_call_id) if plan.parses_calls else None
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.incomplete: str | None = None
        self.usage: dict[str, Any] | None = None
        self._text: list[str] | None = None  # the open message's text pieces
        self._seq = 0

    def response(self) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": None,
            "incomplete_details": {"reason": self.incomplete} if self.incomplete else None,
            "output": list(self.output),
            "usage": self.usage,
            **self.echo,
        }

    def _event(self, kind: str, **fields: Any) -> Event:
        self._seq += 1
        return {"type": f"response.{kind}", "sequence_number": self._seq - 1, **fields}

    def start(self) -> list[Event]:
        snapshot = self.response()
        return [
            self._event("created", response=snapshot),
            self._event("in_progress", response=snapshot),
        ]

    def feed(self, out: RequestOutput) -> list[Event]:
        events: list[Event] = []
        c = out.outputs[0]
        final = c.finish_reason is not None
        if self.parser is None:
            self._content(c.text, events)
        else:
            ev = self.parser.feed(c.text, final=final)
            self._content(ev.content, events)
            for k in ev.calls:
                self._close_message(events)
                self._call(self.parser.calls[k], events)
        if final:
            if not self.output and self._text is None:
                self._content("", events, force=True)  # an empty answer is an empty message
            self._close_message(events)
            self._finish(out, c.finish_reason)
            kind = "completed" if self.status == "completed" else "incomplete"
            events.append(self._event(kind, response=self.response()))
        return events

    def _finish(self, out: RequestOutput, reason: str | None) -> None:
        if reason == "length":
            self.status, self.incomplete = "incomplete", "max_output_tokens"
        else:
            self.status = "completed"
        self.usage = {
            "input_tokens": out.num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "output_tokens": out.num_output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        }

    def _content(self, text: str, events: list[Event], force: bool = False) -> None:
        if not text and not force:
            return
        if self._text is None:
            self._text = []
            item = {
                "id": new_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.output.append(item)
            events.append(self._added(item))
            events.append(self._part("content_part.added", _text_part("")))
        if text:
            self._text.append(text)
            events.append(self._part("output_text.delta", delta=text, logprobs=[]))

    def _part(self, kind: str, part: dict[str, Any] | None = None, **fields: Any) -> Event:
        item = self.output[-1]
        where = {"item_id": item["id"], "output_index": len(self.output) - 1, "content_index": 0}
        return self._event(kind, **where, **({"part": part} if part is not None else {}), **fields)

    def _added(self, item: dict[str, Any]) -> Event:
        return self._event("output_item.added", output_index=len(self.output) - 1, item=dict(item))

    def _done(self) -> Event:
        item = self.output[-1]
        return self._event("output_item.done", output_index=len(self.output) - 1, item=item)

    def _close_message(self, events: list[Event]) -> None:
        if self._text is None:
            return
        text, self._text = "".join(self._text), None
        part = _text_part(text)
        events.append(self._part("output_text.done", text=text, logprobs=[]))
        events.append(self._part("content_part.done", part))
        self.output[-1] |= {"status": "completed", "content": [part]}
        events.append(self._done())

    def _call(self, call: ParsedCall, events: list[Event]) -> None:
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.id,
            "name": call.name,
            "arguments": "",
        }
        self.output.append(item)
        events.append(self._added(item))
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        events.append(self._event("function_call_arguments.delta", **where, delta=call.arguments))
        events.append(
            self._event(
                "function_call_arguments.done", **where, name=call.name, arguments=call.arguments
            )
        )
        item |= {"status": "completed", "arguments": call.arguments}
        events.append(self._done())


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output as the chat turns a follow-up (previous_response_id) continues from."""
    content = "".join(
        p["text"] for item in output if item["type"] == "message" for p in item["content"]
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    turn: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        turn["tool_calls"] = calls
    return [turn]
