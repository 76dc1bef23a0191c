"""Greedy output equals HuggingFace transformers' greedy generate, token for token, in float32."""

from __future__ import annotations

import pytest

from model_parallel.request import SamplingParams
from tests.conftest import hf_greedy, run_all, tokens_of

pytestmark = pytest.mark.slow
MAX_NEW = 24


@pytest.fixture(scope="module")
def reference(hf_model, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, p, MAX_NEW) for p in prompts]


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def _check(results: dict, reference: list[list[int]]) -> None:
    for i, ref in enumerate(reference):
        assert tokens_of(results[f"r{i}"]) == ref, f"prompt {i}"


def test_each_alone(engine_fp32, prompts, reference) -> None:
    for i, p in enumerate(prompts):
        _check_one = run_all(engine_fp32, {f"r{i}": (p, _greedy())})
        assert tokens_of(_check_one[f"r{i}"]) == reference[i]


def test_staggered_batch(engine_fp32, prompts, reference) -> None:
    reqs = {f"r{i}": (p, _greedy()) for i, p in enumerate(prompts)}
    arrivals = {3 * i: [f"r{i}"] for i in range(len(prompts))}  # each joins a running batch
    _check(run_all(engine_fp32, reqs, arrivals), reference)


def test_preemption_with_tiny_pool(make_engine, prompts, reference) -> None:
    engine = make_engine(num_blocks=12, enable_prefix_caching=False)
    reqs = {f"r{i}": (p, _greedy()) for i, p in enumerate(prompts)}
    _check(run_all(engine, reqs), reference)
    assert engine.scheduler.num_preemptions > 0


def test_chunked_prefill(make_engine, prompts, reference) -> None:
    engine = make_engine(max_num_batched_tokens=16)
    reqs = {f"r{i}": (p, _greedy()) for i, p in enumerate(prompts)}
    _check(run_all(engine, reqs, {2 * i: [f"r{i}"] for i in range(len(prompts))}), reference)


def test_prefix_cache_hit(engine_fp32, hf_model, tokenizer) -> None:
    from tests.conftest import chat_ids

    system = (
        "You are a meticulous assistant for a hardware store. Answer briefly, politely, and "
        "only with facts you are sure of. If a question is about tools, name the tool. "
    ) * 2
    first = chat_ids(tokenizer, "Which tool drives nails?", system)
    second = chat_ids(tokenizer, "Which tool cuts wood?", system)
    run_all(engine_fp32, {"warm": (first, _greedy())})
    out = run_all(engine_fp32, {"hit": (second, _greedy())})["hit"]
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert out[-1].num_cached_tokens == common // 16 * 16 > 0
    assert tokens_of(out) == hf_greedy(hf_model, second, MAX_NEW)


def test_all_at_once_with_a_budget_that_splits_prompts(make_engine, prompts, reference) -> None:
    """Chunks of one token that do not sample, and chunks of running sequences ahead of decodes."""
    for budget in (64, 37):
        engine = make_engine(max_num_batched_tokens=budget)
        _check(run_all(engine, {f"r{i}": (p, _greedy()) for i, p in enumerate(prompts)}), reference)
