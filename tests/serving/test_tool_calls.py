"""The tool-call parser on its own: whole and streamed text (cut at every point) give the same
content and the same calls, braces and end tags inside strings included, and a call cut off by
max_tokens in neither; tool_choice checks."""

from __future__ import annotations

import itertools
import json

import pytest

from serving.protocol import ChatCompletionRequest, OpenAIError
from serving.tool_calls import ToolCallParser, plan_tools, render_call

TRICKY = json.dumps({"note": 'a } and a "}\\n</tool_call>" inside', "n": [1, {"x": {}}]})
TEXTS = [
    "Let me check. " + render_call("get_weather", '{"location": "Paris"}'),
    render_call("ping", "{}"),
    render_call("log", TRICKY) + "\n" + render_call("get_weather", '{"location": "Oslo"}'),
    "No tools needed: 2 < 3 and {braces} are fine.",
    render_call("get_weather", '{"location": "Par'),  # cut by max_tokens
]


def parse(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    ids = itertools.count()
    parser = ToolCallParser(lambda: f"call_{next(ids)}")
    content, handed_out = "", []
    for i, piece in enumerate(pieces):
        ev = parser.feed(piece, final=i == len(pieces) - 1)
        content += ev.content
        handed_out += ev.calls
    assert handed_out == list(range(len(parser.calls)))  # each call once, in order
    return content, [(c.name, c.arguments) for c in parser.calls]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_equals_whole_at_every_cut(text: str) -> None:
    whole = parse([text])
    for cut in range(1, len(text)):
        assert parse([text[:cut], text[cut:]]) == whole
    assert parse(list(text)) == whole  # one character at a time


def test_what_the_parser_finds() -> None:
    assert parse([TEXTS[0]]) == ("Let me check.", [("get_weather", '{"location": "Paris"}')])
    assert parse([TEXTS[1]]) == ("", [("ping", "{}")])
    content, calls = parse([TEXTS[2]])
    assert content == "" and [json.loads(a) for _, a in calls][0] == json.loads(TRICKY)
    assert parse([TEXTS[3]]) == (TEXTS[3], [])
    assert parse([TEXTS[4]]) == ("", [])  # the cut call is no call, streamed or not


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
            "parameters",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}
                ]
            },
            "parameters",
        ),
        ({"tools": [TOOL, TOOL]}, "tools"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(kw: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as e:
        plan_tools(chat(**kw))
    assert e.value.status == 400 and param in e.value.param


def test_plans() -> None:
    assert plan_tools(chat()).mode == "none"
    assert plan_tools(chat(tools=[TOOL])).mode == "auto"
    assert plan_tools(chat(tools=[TOOL], tool_choice="none")).guide() is None
    named = plan_tools(
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    )
    assert named.mode == "required" and not named.parallel and named.guide() is not None
