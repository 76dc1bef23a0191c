"""The Responses API with the real openai client (text, streamed events in OpenAI's order, tools
and a follow-up through previous_response_id, text.format, max_output_tokens), the OpenAI Agents
SDK's default path with a function tool, and vLLM's /tokenize and /detokenize."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.e2e.conftest import API_KEY, MODEL
from tests.e2e.test_tools_and_structured import PROFILE

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get current weather for a location",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}
ASK = "Name three colours of the rainbow."


def events_of(stream) -> list:  # noqa: ANN001
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_text_whole_streamed_and_stored(client) -> None:  # noqa: ANN001
    kw = {"model": MODEL, "input": ASK, "instructions": "Be brief.", "temperature": 0}
    whole = client.responses.create(max_output_tokens=40, **kw)
    assert whole.object == "response" and whole.output_text
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 40
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    events = events_of(client.responses.create(max_output_tokens=40, stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text  # greedy: the same
    stored = client.responses.retrieve(whole.id)
    assert stored.id == whole.id and stored.output_text == whole.output_text
    cut = client.responses.create(max_output_tokens=3, **kw)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    r = httpx.get(f"{client.base_url}responses/resp_unknown", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_tools_streamed_whole_and_a_follow_up(client) -> None:  # noqa: ANN001
    kw = {
        "model": MODEL,
        "input": "What's the weather in Paris?",
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0,
    }
    whole = client.responses.create(**kw)
    calls = [o for o in whole.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    events = events_of(client.responses.create(stream=True, **kw))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [c.arguments for c in calls]
    assert events[-1].type == "response.completed"
    named = client.responses.create(
        **{**kw, "tool_choice": {"type": "function", "name": "get_weather"}}
    )
    assert [o.name for o in named.output if o.type == "function_call"] == ["get_weather"]
    answer = [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "clear"}]
    turn = {"model": MODEL, "input": answer, "tools": [WEATHER], "tool_choice": "none"}
    follow = client.responses.create(previous_response_id=whole.id, max_output_tokens=40, **turn)
    assert follow.previous_response_id == whole.id and follow.output_text
    alone = client.responses.create(max_output_tokens=1, **turn)
    # the stored conversation (the question and the call) is in the follow-up's prompt
    assert follow.usage.input_tokens > alone.usage.input_tokens + 10


def test_text_format_json_schema_and_json_object(client) -> None:  # noqa: ANN001
    fmt = {"type": "json_schema", "name": "profile", "schema": PROFILE, "strict": True}
    r = client.responses.create(
        model=MODEL, input="Describe a user as JSON.", text={"format": fmt}, max_output_tokens=400
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PROFILE)
    r = client.responses.create(
        model=MODEL,
        input="Give me a JSON object.",
        text={"format": {"type": "json_object"}},
        max_output_tokens=200,
    )
    assert r.status != "completed" or isinstance(json.loads(r.output_text), dict)


def test_the_agents_sdk_calls_a_function_tool(server: str) -> None:
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"sunny in {city}"

    client = AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Answer questions about the weather with the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0),
        tool_use_behavior="stop_on_first_tool",
    )
    result = agents.Runner.run_sync(agent, "What's the weather in Paris?", max_turns=3)
    assert len(asked) == 1 and result.final_output == f"sunny in {asked[0]}"


def test_tokenize_and_detokenize_match_the_engine(client, server: str) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "Hello there"}]
    r = httpx.post(f"{server}/tokenize", headers=AUTH, json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    chat = r.json()
    used = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat["count"] == len(chat["tokens"]) == used.usage.prompt_tokens
    assert chat["max_model_len"] > chat["count"]
    r = httpx.post(
        f"{server}/tokenize",
        headers=AUTH,
        json={"prompt": "Hello there", "return_token_strs": True},
    )
    plain = r.json()
    assert len(plain["token_strs"]) == plain["count"] > 0
    r = httpx.post(f"{server}/detokenize", headers=AUTH, json={"tokens": plain["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello there"
