"""The OpenAI chat API end to end: the seed's examples verbatim, every parameter's effect, usage
counts and streaming shapes, through Ray Serve with the real openai client and engine."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.slow
Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_seed_basic_multi_turn_and_streaming_examples(client) -> None:  # noqa: ANN001
    response = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0.7,
        max_tokens=100,
    )
    assert response.choices[0].message.content
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"

    messages = [{"role": "system", "content": "You are a math tutor."}]
    messages.append({"role": "user", "content": "What is 2 + 2?"})
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60)
    messages.append({"role": "assistant", "content": response.choices[0].message.content})
    messages.append({"role": "user", "content": "And what is that times 3?"})
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60)
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens > response.usage.prompt_tokens  # the history was sent

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short story."}],
        stream=True,
        max_tokens=60,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason is not None


def test_greedy_is_deterministic_and_answers(client) -> None:  # noqa: ANN001
    a = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=20)
    b = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=20)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert "Paris" in a.choices[0].message.content


def test_max_tokens_length_and_exact_usage(client, tokenizer) -> None:  # noqa: ANN001
    from tests.conftest import chat_ids

    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = client.chat.completions.create(
            model=MODEL, messages=Q, extra_body={"ignore_eos": True}, **kw
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5
        assert r.usage.prompt_tokens == len(chat_ids(tokenizer, Q[0]["content"]))
        assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_n_choices_plain_and_streamed(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model=MODEL, messages=Q, n=3, max_tokens=8, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=Q, n=2, max_tokens=8, stream=True)
    )
    assert all(len(c.choices) == 1 for c in chunks)  # one choice per chunk, as OpenAI sends
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_strings_plain_and_streamed(client) -> None:  # noqa: ANN001
    full = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=20)
    text = full.choices[0].message.content
    stop = text[6:10]
    r = client.chat.completions.create(
        model=MODEL, messages=Q, temperature=0, max_tokens=20, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(
        model=MODEL, messages=Q, temperature=0, max_tokens=20, stop=stop, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[: text.index(stop)]


def test_include_usage_chunk(client) -> None:  # noqa: ANN001
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=Q,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_logprobs_and_top_logprobs(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(
        model=MODEL, messages=Q, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the top one
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_seed_reproducible(client) -> None:  # noqa: ANN001
    def run(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=MODEL, messages=Q, temperature=1.0, max_tokens=16, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert run(7) == run(7)
    assert len({run(7), run(8), run(9)}) > 1


def test_logit_bias_forces_a_token(client, tokenizer) -> None:  # noqa: ANN001
    token = tokenizer.encode(" yes", add_special_tokens=False)[0]
    r = client.chat.completions.create(
        model=MODEL, messages=Q, max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    assert r.choices[0].message.content == " yes" * 4


def test_penalties_and_vllm_extras_are_accepted(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(
        model=MODEL,
        messages=Q,
        max_tokens=8,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4},
    )
    assert r.usage.completion_tokens >= 4


def test_models_and_model_card(client) -> None:  # noqa: ANN001
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completions_api(client) -> None:  # noqa: ANN001
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens <= 5
    multi = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=3, n=2)
    assert sorted(c.index for c in multi.choices) == [0, 1, 2, 3]
    echo = client.completions.create(model=MODEL, prompt=[504, 3575], max_tokens=2, echo=True)
    assert echo.choices[0].text.startswith("The capital")
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=4, stream=True, logprobs=2
        )
    )
    assert any(c.choices and c.choices[0].logprobs for c in chunks)
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=["One", "Two"], max_tokens=3, n=2, stream=True
        )
    )
    assert all(len(c.choices) == 1 for c in streamed)
    assert {c.choices[0].index for c in streamed if c.choices[0].finish_reason} == {0, 1, 2, 3}


def test_cached_tokens_reported_from_the_prefix_cache(client) -> None:  # noqa: ANN001
    system = "You are a careful assistant for a bakery. Answer in one short sentence. " * 4
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hours?"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
    msgs[1]["content"] = "Do you sell bread?"
    second = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 48 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details is not None
