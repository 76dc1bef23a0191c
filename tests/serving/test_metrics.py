"""The MetricsStore's sums over replicas: a replica that stops reporting leaves the gauges at
once and the counters after a minute."""

from __future__ import annotations

import re

import pytest

from serving.metrics import MetricsStore


def stats(running: int, blocks: int, prompt_tokens: int) -> dict:
    engine = {
        "num_running": running,
        "num_waiting": 0,
        "kv_blocks_used": blocks,
        "kv_blocks_total": 100,
        "prefix_queried_tokens": 0,
        "prefix_hit_tokens": 0,
        "num_preemptions": 0,
    }
    requests = {
        "finished": {"stop": 1},
        "prompt_tokens": prompt_tokens,
        "generation_tokens": 0,
        "hist": {},
        "sums": {},
    }
    return {"engine": engine, "requests": requests}


def value(text: str, name: str) -> float:
    m = re.search(rf"^llmcluster_{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_a_silent_replica_leaves_gauges_then_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving import metrics

    now = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    monkeypatch.setattr(metrics, "HISTOGRAMS", {})
    store = MetricsStore()
    store.report("m", "a", stats(2, 7, 10))
    store.report("m", "b", stats(1, 3, 5))
    text = store.render()
    assert value(text, "kv_cache_blocks_used") == 10 and value(text, "prompt_tokens_total") == 15
    assert value(text, "kv_cache_blocks_total") == 200  # a gauge keeps its _total
    now[0] += 6
    store.report("m", "a", stats(0, 0, 12))  # 'b' died with a request in flight
    text = store.render()
    assert value(text, "kv_cache_blocks_used") == 0 and value(text, "num_requests_running") == 0
    assert value(text, "prompt_tokens_total") == 17
    now[0] += 60
    store.report("m", "a", stats(0, 0, 12))
    assert value(store.render(), "prompt_tokens_total") == 12
    store.count_resumed("m")
    assert value(store.render(), "request_resumes_total") == 1
