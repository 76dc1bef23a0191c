"""Concurrency, client disconnects freeing KV blocks, /health and /metrics, and the two ways a
model is served: from its own replica (direct streaming) and behind a separate ingress."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.e2e.conftest import API_KEY, MODEL

pytestmark = pytest.mark.slow


def metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    m = re.search(rf"^llmcluster_{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_direct_and_separate_ingress_stream_the_same_tokens(server: str, client) -> None:  # noqa: ANN001
    """The main app is one deployment (the model replica answers HTTP); the keyless /open app is
    an OpenAIIngress that reaches that replica through a Serve handle. Only the latter has a
    MetricsStore actor: the direct replica renders /metrics itself."""
    import ray
    from openai import OpenAI
    from ray import serve

    assert list(serve.status().applications["llmcluster"].deployments) == [f"LLMServer:{MODEL}"]
    assert "OpenAIIngress" in serve.status().applications["open"].deployments
    actors = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert "llmcluster-metrics-open" in actors and "llmcluster-metrics-llmcluster" not in actors
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=24)
    greedy = {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.1}}
    answers = []
    for c, extra in ((client, greedy), (OpenAI(base_url=f"{server}/open/v1", api_key="-"), {})):
        stream = c.chat.completions.create(**ask, **extra, stream=True)
        answers.append("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
    assert answers[0] and answers[0] == answers[1]


def test_64_concurrent_streams_all_finish(aclient) -> None:  # noqa: ANN001
    async def one(i: int) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=8,
            stream=True,
        )
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        assert reason in ("stop", "length")
        return text

    async def main() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), timeout=300)

    texts = asyncio.run(main())
    assert len(texts) == 64


def test_disconnected_streams_free_their_blocks(server: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 2000,
        "stream": True,
        "extra": 1,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as http:
        for _ in range(4):
            with http.stream(
                "POST", f"{server}/v1/chat/completions", json=body, headers=headers
            ) as r:
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
            # leaving the block closes the connection mid-stream
    # /metrics can lag the engine (behind a separate ingress, by a report period of 1 s): a zero
    # read just after the last disconnect can predate that request (CI once saw its 3 blocks
    # right after such a zero). So: zero on two reads a report period and a half apart.
    deadline, zero_since = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        idle = (
            metric(server, "kv_cache_blocks_used") == 0
            and metric(server, "num_requests_running") == 0
        )
        zero_since = (zero_since or time.monotonic()) if idle else None
        if zero_since is not None and time.monotonic() - zero_since >= 1.5:
            break
        time.sleep(0.5)
    text = httpx.get(f"{server}/metrics", headers=headers).text
    gauges = "\n".join(line for line in text.splitlines() if "_num_requests_" in line)
    assert metric(server, "kv_cache_blocks_used") == 0, gauges
    assert metric(server, "num_requests_running") == 0, gauges


def test_health_and_metrics(server: str, client) -> None:  # noqa: ANN001
    r = httpx.get(f"{server}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    time.sleep(1.5)  # replicas report every second
    assert metric(server, "generation_tokens_total") > 0
    assert metric(server, "kv_cache_blocks_total") > 0
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in (
        "time_to_first_token_seconds_bucket",
        "e2e_request_latency_seconds_count",
        "prefix_cache_hit_rate",
        "request_success_total",
        "num_requests_waiting",
    ):
        assert f"llmcluster_{name}" in text
    # vLLM's names, summed the same way, so that its dashboards read ours unchanged
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours, theirs = families["llmcluster_generation_tokens"], families["vllm:generation_tokens"]
    assert [s.value for s in ours.samples] == [s.value for s in theirs.samples]
    assert theirs.samples[0].labels == {"model_name": MODEL}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_success",
    ):
        assert name in families, name
    assert 0 <= families["vllm:kv_cache_usage_perc"].samples[0].value <= 1


def test_bench_counts_what_the_server_streamed(server: str) -> None:
    """`llmcluster bench` reads the SSE lines itself: every token the server streamed is timed
    and counted, on both routes, and a refused request is a failure with its reason."""
    import argparse

    from cluster import bench

    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    common = ["--base-url", f"{server}/v1", "--api-key", API_KEY, "--no-progress"]
    common += ["--num-prompts", "3", "--concurrency", "2", "--max-tokens", "8"]
    for dataset in ("builtin", "random"):
        report = asyncio.run(bench.run(ap.parse_args([*common, "--dataset", dataset])))
        assert report["model"] == MODEL and report["failed"] == 0, report["errors"]
        assert report["output_tokens"] == 3 * 8  # ignore_eos: every request runs to max_tokens
        assert 0 < report["ttft"]["p50_ms"] < report["e2e"]["p50_ms"]
        assert report["tpot"]["p50_ms"] > 0
    refused = ap.parse_args([*common, "--model", MODEL, "--api-key", "wrong"])
    report = asyncio.run(bench.run(refused))
    assert report["completed"] == 0 and "HTTP 401" in report["errors"][0]
