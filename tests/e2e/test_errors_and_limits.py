"""Bad input gets OpenAI-shaped 4xx errors with the right status and param, never a 500; keys,
body limits, health and metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import API_KEY, MODEL

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MSG = [{"role": "user", "content": "hi"}]


def post(
    server: str, body: object, path: str = "/v1/chat/completions", headers: dict | None = None
) -> httpx.Response:
    kw = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
    return httpx.post(
        f"{server}{path}", headers=AUTH if headers is None else headers, timeout=60, **kw
    )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "messages": MSG, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": MSG, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": MSG, "presence_penalty": -3}, "presence_penalty"),
        ({"model": MODEL, "messages": MSG, "frequency_penalty": 2.5}, "frequency_penalty"),
        ({"model": MODEL, "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "n": 100}, "n"),
        ({"model": MODEL, "messages": MSG, "logprobs": True, "top_logprobs": 25}, "top_logprobs"),
        ({"model": MODEL, "messages": MSG, "logit_bias": {"5": 150}}, "logit_bias"),
        ({"model": MODEL, "messages": MSG, "stop": ["x"] * 40}, "stop"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": MODEL, "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": MSG, "tools": [{"type": "function"}]}, "tools"),
        ({"model": MODEL, "messages": MSG, "response_format": {"type": "xml"}}, "response_format"),
        (
            {
                "model": MODEL,
                "messages": MSG,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
                },
            },
            "response_format",
        ),
        (
            {"model": MODEL, "messages": MSG, "structured_outputs": {"regex": "(unclosed"}},
            "structured_outputs",
        ),
        (
            {"model": MODEL, "messages": MSG, "guided_choice": [], "guided_regex": "a"},
            "guided_choice",
        ),
        ({"model": MODEL, "messages": MSG, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "model": MODEL,
                "messages": MSG,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        (
            {
                "model": MODEL,
                "messages": MSG,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        ({"model": MODEL, "messages": MSG, "chat_template": "{{ 7*7 }}"}, "chat_template"),
        # OpenAI's strict checks: no content, non-boolean or non-integer values, options that
        # need another field, an empty tool list
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.content"),
        ({"model": MODEL, "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": MSG, "max_tokens": 5.5}, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "n": "2"}, "n"),
        ({"model": MODEL, "messages": MSG, "logprobs": 1}, "logprobs"),
        (
            {"model": MODEL, "messages": MSG, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": MODEL, "messages": MSG, "tools": []}, "tools"),
        (
            {"model": MODEL, "messages": MSG, "chat_template_kwargs": {"tokenize": True}},
            "chat_template_kwargs",
        ),
    ],
)
def test_invalid_requests_are_400_naming_the_param(server: str, body: dict, param: str) -> None:
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param.split(".")[0])


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": "true"}, "echo"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/responses", {"model": MODEL}, "input"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "stream": 1}, "stream"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output"),
        ("/v1/responses", {"model": MODEL, "input": [{"role": "user"}]}, "input.0"),
        (
            "/v1/responses",
            {"model": MODEL, "input": [{"type": "input_image", "image_url": "x"}]},
            "input.0",
        ),
        (
            "/v1/responses",
            {"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]},
            "tools",
        ),
        (
            "/v1/responses",
            {"model": MODEL, "input": "hi", "text": {"format": {"type": "xml"}}},
            "text.format",
        ),
        (
            "/v1/responses",
            {"model": MODEL, "input": "hi", "tool_choice": "required"},
            "tool_choice",
        ),
        (
            "/v1/responses",
            {"model": MODEL, "input": "hi", "previous_response_id": "resp_nope"},
            "previous_response_id",
        ),
        ("/tokenize", {"model": MODEL}, "prompt"),
        ("/tokenize", {"model": MODEL, "prompt": "a", "messages": MSG}, "prompt"),
        ("/tokenize", {"model": MODEL, "prompt": "a", "add_special_tokens": "no"}, "add_special"),
        ("/detokenize", {"model": MODEL, "tokens": [10**7]}, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": "abc"}, "tokens"),
    ],
)
def test_other_apis_refuse_bad_input_naming_the_param(
    server: str, path: str, body: dict, param: str
) -> None:
    r = post(server, body, path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param), err


def test_malformed_json_and_non_object(server: str) -> None:
    assert post(server, "{not json").status_code == 400
    assert post(server, "[1, 2]").status_code == 400


def test_vocab_and_context_limits(server: str) -> None:
    r = post(server, {"model": MODEL, "messages": MSG, "logit_bias": {"999999": 1}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    long = [{"role": "user", "content": "word " * 9000}]
    r = post(server, {"model": MODEL, "messages": long})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "8192" in msg and "tokens" in msg
    r = post(server, {"model": MODEL, "prompt": [10**7]}, "/v1/completions")
    assert r.status_code == 400


def test_unknown_model_is_404(server: str) -> None:
    r = post(server, {"model": "gpt-4", "messages": MSG})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_oversized_body_is_413(server: str) -> None:
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert r.status_code == 413


def test_api_key_required_on_every_route_but_health(server: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        assert post(server, {"model": MODEL, "messages": MSG}, headers=headers).status_code == 401
        assert httpx.get(f"{server}/v1/models", headers=headers).status_code == 401
        assert httpx.get(f"{server}/metrics", headers=headers).status_code == 401
        assert httpx.get(f"{server}/v1/responses/resp_x", headers=headers).status_code == 401
        for path, body in [
            ("/v1/responses", {"model": MODEL, "input": "hi"}),
            ("/tokenize", {"prompt": "hi"}),
            ("/detokenize", {"tokens": [1]}),
        ]:
            assert post(server, body, path, headers=headers).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200


def test_no_key_configured_means_open(server: str) -> None:
    r = post(
        server,
        {"model": MODEL, "messages": MSG, "max_tokens": 3},
        "/open/v1/chat/completions",
        headers={},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_openai_client_raises_typed_errors(client) -> None:  # noqa: ANN001
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MSG, temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
