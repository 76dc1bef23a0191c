"""Tool calling and structured output end to end, with the real openai client and engine: the
seed's examples verbatim, calls that always parse and validate (required, named and auto), the
same arguments streamed and whole, JSON that matches its schema, and a shared batch."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.e2e.conftest import API_KEY, MODEL

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get current weather for a location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
WEATHER_NAME = {"name": "get_weather"}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
NOTE = {
    "type": "function",
    "function": {
        "name": "save_note",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
}
CITIES = [
    "Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Berlin", "Madrid", "Nairobi", "Sydney", "Toronto",
    "Seoul", "Rome", "Dublin", "Hanoi", "Quito", "Delhi", "Lagos", "Prague", "Austin", "Perth",
]  # fmt: skip
ASKS = [
    "What's the weather in {}?",
    "Is it raining in {} right now?",
    "How warm is it in {} in fahrenheit?",
    "Check the weather for {} please.",
]
# One earlier call and its result: the conversation an agent sends on its second turn.
HISTORY = [
    {"role": "user", "content": "What's the weather in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location": "Rome"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21 degrees and clear in Rome."},
]


def asks(n: int = 20) -> list[str]:
    return [ASKS[i % len(ASKS)].format(CITIES[i]) for i in range(n)]


def concurrently(server: str, fn: Callable[..., Awaitable[Any]], items: list) -> list:
    """fn(client, item) for every item at once, on a client of this event loop."""
    from openai import AsyncOpenAI

    async def main() -> list:
        async with AsyncOpenAI(
            base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300
        ) as client:
            return await asyncio.wait_for(asyncio.gather(*(fn(client, x) for x in items)), 600)

    return asyncio.run(main())


async def call(client: Any, stream: bool, **kw: Any) -> tuple[str | None, list[dict], str]:
    """(content, tool calls as dicts, finish_reason), streamed or not."""
    kw = {"model": MODEL, "max_tokens": 120, **kw}
    if not stream:
        r = await client.chat.completions.create(**kw)
        c = r.choices[0]
        calls = [tc.model_dump() for tc in c.message.tool_calls or []]
        return c.message.content, calls, c.finish_reason
    content, calls, reason = "", {}, None
    async for chunk in await client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            assert "<tool_call>" not in (ch.delta.content or "")
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                if tc.id is not None:  # the id, type and name come once, first
                    assert tc.index not in calls
                    calls[tc.index] = {
                        "id": tc.id,
                        "type": tc.type,
                        "function": {"name": tc.function.name, "arguments": ""},
                    }
                else:
                    assert tc.function.name is None
                calls[tc.index]["function"]["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    return content or None, [calls[i] for i in sorted(calls)], reason


def assert_valid(calls: list[dict], tools: list[dict]) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools}
    for c in calls:
        assert c["id"].startswith("call_") and c["type"] == "function"
        args = json.loads(c["function"]["arguments"])
        jsonschema.validate(args, schemas[c["function"]["name"]] or {"type": "object"})


def test_seed_tool_and_json_mode_examples_verbatim(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/open/v1", api_key="EMPTY")
    tools = [WEATHER]
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=tools,
        tool_choice="auto",
    )
    if response.choices[0].message.tool_calls:
        tool_call = response.choices[0].message.tool_calls[0]
        print(f"Tool: {tool_call.function.name}")
        print(f"Args: {tool_call.function.arguments}")
        json.loads(tool_call.function.arguments)
    else:
        assert response.choices[0].message.content

    response = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Output JSON only."},
            {
                "role": "user",
                "content": "List 3 programming languages with their year of creation.",
            },
        ],
        response_format={"type": "json_object"},
        max_tokens=200,
    )
    data = json.loads(response.choices[0].message.content)
    print(json.dumps(data, indent=2))
    assert isinstance(data, dict)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_required_and_named_give_a_valid_call_every_time(server: str, choice: str) -> None:
    tool_choice = (
        "required" if choice == "required" else {"type": "function", "function": WEATHER_NAME}
    )
    tools = [WEATHER, CLOCK] if choice == "required" else [CLOCK, WEATHER]

    async def one(client: Any, item: tuple[str, bool]) -> tuple:
        ask, stream = item
        messages = [{"role": "user", "content": ask}]
        return await call(
            client,
            stream,
            messages=messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            temperature=0.3,  # sampled, mildly: hotter, the tiny model's strings can run on
            seed=1,
        )

    items = [(a, s) for a in asks() for s in (False, True)]
    for content, calls, reason in concurrently(server, one, items):
        assert len(calls) == 1 and reason == "tool_calls" and not content
        assert_valid(calls, tools)
        if choice == "named":
            assert calls[0]["function"]["name"] == "get_weather"


def test_parallel_calls_and_a_call_cut_by_max_tokens(client) -> None:  # noqa: ANN001
    ask = [{"role": "user", "content": "What's the weather in Paris and in Tokyo?"}]
    r = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required", temperature=0
    )
    calls = [tc.model_dump() for tc in r.choices[0].message.tool_calls]
    assert len(calls) >= 2 and r.choices[0].finish_reason == "tool_calls"
    assert_valid(calls, [WEATHER])
    kw = {"model": MODEL, "messages": ask, "tools": [WEATHER], "tool_choice": "required"}
    cut = client.chat.completions.create(max_tokens=8, **kw)
    assert cut.choices[0].finish_reason == "length" and not cut.choices[0].message.tool_calls
    # greedy, cut inside the last call: whole and streamed list the same complete calls, and
    # the stream never opens the one that cannot parse
    short = r.usage.completion_tokens - 3
    whole = client.chat.completions.create(max_tokens=short, temperature=0, **kw).choices[0]
    pieces = [
        tc.model_dump()
        for chunk in client.chat.completions.create(
            max_tokens=short, temperature=0, stream=True, **kw
        )
        for ch in chunk.choices
        for tc in ch.delta.tool_calls or []
    ]
    assert whole.finish_reason == "length" and len(whole.message.tool_calls) == len(calls) - 1
    assert [p["function"] for p in pieces] == [
        tc.function.model_dump() for tc in whole.message.tool_calls
    ]


def test_streamed_and_whole_calls_carry_identical_arguments(server: str) -> None:
    """Greedy requests, each asked streamed and not: the same arguments to the character, for
    plain arguments, a parameterless tool (`{}`) and braces and end tags inside strings."""
    note = 'Save this note: {"a": "}"} and </tool_call> are fine'
    cases = [([WEATHER], "required", a) for a in asks(8)] + [
        ([CLOCK], {"type": "function", "function": {"name": "get_time"}}, "What time is it?"),
        ([NOTE], {"type": "function", "function": {"name": "save_note"}}, note),
    ]

    async def both(client: Any, case: tuple) -> tuple:
        tools, tool_choice, ask = case
        kw = {
            "messages": [{"role": "user", "content": ask}],
            "tools": tools,
            "tool_choice": tool_choice,
            "temperature": 0,
            "extra_body": {"repetition_penalty": 1.1},  # greedy alone loops on the note
        }
        return await call(client, False, **kw), await call(client, True, **kw)

    results = concurrently(server, both, cases)
    for (whole, streamed), (tools, _, _) in zip(results, cases, strict=True):
        assert [c["function"] for c in whole[1]] == [c["function"] for c in streamed[1]]
        # "length": a further parallel call was cut by max_tokens (Madrid's third in bf16 on the
        # Zen 4); both list only the complete calls
        assert whole[2] == streamed[2] in ("tool_calls", "length")
        assert_valid(whole[1], tools)
    clock, note_call = results[-2][0][1], results[-1][0][1]
    assert [json.loads(c["function"]["arguments"]) for c in clock] == [{}]
    assert "text" in json.loads(note_call[0]["function"]["arguments"])


def test_auto_mode_calls_always_parse(server: str) -> None:
    """auto over 20 prompts that invite a call, sampled, streamed and not: the model decides
    whether to call, and whatever it calls parses and matches the schema."""

    async def one(client: Any, item: tuple[int, str]) -> tuple:
        i, ask = item
        messages = [*HISTORY, {"role": "user", "content": ask}]
        return await call(
            client, i % 2 == 1, messages=messages, tools=[WEATHER], temperature=0.7, seed=i
        )

    results = concurrently(server, one, list(enumerate(asks())))
    called = [calls for _, calls, _ in results if calls]
    for content, calls, reason in results:
        assert "<tool_call>" not in (content or "")
        assert reason == ("tool_calls" if calls else "stop") or reason == "length"
        assert_valid(calls, [WEATHER])
    assert len(called) >= 5, f"only {len(called)} of 20 called the tool"


# A user profile: enum, integer range, nested object, array, pattern, required fields and
# additionalProperties false (benchmarks/structured_throughput.py times it too).
PROFILE = json.loads((Path(__file__).parent / "profile.schema.json").read_text())


def test_json_schema_output_validates(server: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "profile", "schema": PROFILE}}

    async def one(client: Any, item: tuple[int, str]) -> tuple:
        i, city = item
        r = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": f"Make up a user profile for someone in {city}."}
            ],
            response_format=fmt,
            max_tokens=320,  # a sampled answer took 200+ once (it indents a lot)
            temperature=0.8,
            seed=i,
            stream=i % 2 == 1,
        )
        if i % 2 == 0:
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, reason = "", None
        async for chunk in r:
            for ch in chunk.choices:
                text, reason = text + (ch.delta.content or ""), ch.finish_reason or reason
        return text, reason

    results = concurrently(server, one, list(enumerate(CITIES)))
    for text, reason in results:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PROFILE)


def test_json_object_parses_when_it_stops(server: str) -> None:
    async def one(client: Any, city: str) -> tuple:
        r = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "Output JSON only."},
                {"role": "user", "content": f"Describe {city} in a few fields."},
            ],
            response_format={"type": "json_object"},
            max_tokens=200,
            temperature=0.3,
            seed=3,
            extra_body={"repetition_penalty": 1.1},
        )
        return r.choices[0].message.content, r.choices[0].finish_reason

    results = concurrently(server, one, CITIES[:10])
    stopped = [text for text, reason in results if reason == "stop"]
    assert len(stopped) >= 3  # a free-form object may ramble on to max_tokens
    for text in stopped:
        assert isinstance(json.loads(text), dict)
    for text, _ in results:
        assert "\n" * 13 not in text and " " * 13 not in text  # bounded whitespace


def test_vllm_extras_and_a_shared_batch(server: str) -> None:
    """vLLM's structured_outputs / guided_* fields, in one batch with unconstrained greedy
    requests, whose answers stay what they are alone (batch invariance)."""
    q = [{"role": "user", "content": "Name a color."}]
    guided = [
        (
            {"extra_body": {"structured_outputs": {"choice": ["red", "green"]}}},
            lambda t: t in ("red", "green"),
        ),
        ({"extra_body": {"guided_choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        (
            {"extra_body": {"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}}},
            lambda t: re.fullmatch("[A-Z]{3}-[0-9]{2}", t),
        ),
        (
            {"extra_body": {"guided_json": {"type": "object", "properties": {}}}},
            lambda t: json.loads(t) == {},
        ),
    ]

    async def one(client: Any, kw: dict) -> str:
        r = await client.chat.completions.create(
            model=MODEL, messages=q, max_tokens=24, temperature=0, **kw
        )
        return r.choices[0].message.content

    free = [{"messages": [{"role": "user", "content": f"Count to {i}."}]} for i in range(4)]

    async def free_one(client: Any, kw: dict) -> str:
        r = await client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, **kw)
        return r.choices[0].message.content

    async def mixed(client: Any, item: tuple[str, dict]) -> str:
        kind, kw = item
        return await (one(client, kw) if kind == "guided" else free_one(client, kw))

    alone = [concurrently(server, free_one, [f])[0] for f in free]
    items = [("guided", g) for g, _ in guided] + [("free", f) for f in free]
    outs = concurrently(server, mixed, items)
    for (_, check), text in zip(guided, outs, strict=False):
        assert check(text), text
    assert outs[len(guided) :] == alone

    comp = concurrently(
        server,
        lambda c, p: c.completions.create(
            model=MODEL, prompt=p, max_tokens=8, extra_body={"guided_regex": "[0-9]+"}
        ),
        ["The answer is "],
    )[0]
    assert comp.choices[0].text.isdigit()
