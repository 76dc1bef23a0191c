"""Request metrics in Prometheus' text format (through prometheus_client), summed across every
LLMServer replica, under our `llmcluster_*` names and, beside them, vLLM's `vllm:*` names and
`model_name` label, so that dashboards and autoscalers built for vLLM read them unchanged."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from model_parallel.request import RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HISTOGRAMS = {
    "time_to_first_token_seconds": TTFT_BUCKETS,
    "time_per_output_token_seconds": TPOT_BUCKETS,
    "inter_token_latency_seconds": TPOT_BUCKETS,
    "e2e_request_latency_seconds": E2E_BUCKETS,
}
PREFIX = "llmcluster"
# ours -> vLLM's (its v1 engine's names; a counter's `_total` is added when rendered)
VLLM_NAMES = {
    "num_requests_running": "vllm:num_requests_running",
    "num_requests_waiting": "vllm:num_requests_waiting",
    "kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "prompt_tokens_total": "vllm:prompt_tokens",
    "generation_tokens_total": "vllm:generation_tokens",
    "request_success_total": "vllm:request_success",
    "prefix_cache_queries_total": "vllm:prefix_cache_queries",
    "prefix_cache_hits_total": "vllm:prefix_cache_hits",
    "num_preemptions_total": "vllm:num_preemptions",
    "time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "time_per_output_token_seconds": "vllm:request_time_per_output_token_seconds",
    "inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
}
# (metric, type, help, "requests" or "engine" stats, key): summed over replicas as they are
SUMMED = [
    ("prompt_tokens_total", "counter", "Prefilled prompt tokens.", "requests", "prompt_tokens"),
    ("generation_tokens_total", "counter", "Generated tokens.", "requests", "generation_tokens"),
    ("num_requests_running", "gauge", "Sequences in the running batch.", "engine", "num_running"),
    (
        "num_requests_waiting",
        "gauge",
        "Sequences waiting to be scheduled.",
        "engine",
        "num_waiting",
    ),
    ("kv_cache_blocks_used", "gauge", "KV-cache blocks in use.", "engine", "kv_blocks_used"),
    (
        "kv_cache_blocks_total",
        "gauge",
        "KV-cache blocks in the pools.",
        "engine",
        "kv_blocks_total",
    ),
    (
        "prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        "engine",
        "prefix_queried_tokens",
    ),
    (
        "prefix_cache_hits_total",
        "counter",
        "Prompt tokens found in the prefix cache.",
        "engine",
        "prefix_hit_tokens",
    ),
    (
        "num_preemptions_total",
        "counter",
        "Sequences preempted for KV space.",
        "engine",
        "num_preemptions",
    ),
]


class EngineMetrics:
    """One replica's counters and histograms (plain numbers, cheap to ship to the ingress)."""

    def __init__(self) -> None:
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.hist = {name: [0] * (len(b) + 1) for name, b in HISTOGRAMS.items()}
        self.sums = dict.fromkeys(HISTOGRAMS, 0.0)

    def _observe(self, name: str, value: float, count: int = 1) -> None:
        self.hist[name][bisect.bisect_left(HISTOGRAMS[name], value)] += count
        self.sums[name] += value * count

    def observe_request(self, last: RequestOutput, start: float, first: float, end: float) -> None:
        for c in last.outputs:
            reason = c.finish_reason or "abort"
            self.finished[reason] = self.finished.get(reason, 0) + 1
        self.prompt_tokens += last.num_prompt_tokens
        self.generation_tokens += last.num_output_tokens
        self._observe("time_to_first_token_seconds", first - start)
        self._observe("e2e_request_latency_seconds", end - start)
        if last.num_output_tokens > 1:
            gaps = last.num_output_tokens - 1
            self._observe("time_per_output_token_seconds", (end - first) / gaps)
            # each gap at the request's mean: the replica sees tokens in batches of a step
            self._observe("inter_token_latency_seconds", (end - first) / gaps, gaps)

    def snapshot(self) -> dict[str, Any]:
        return {
            "finished": dict(self.finished),
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "hist": {k: list(v) for k, v in self.hist.items()},
            "sums": dict(self.sums),
        }


def exported(name: str) -> list[str]:
    """A metric's full names: ours, and vLLM's where it has one."""
    return [f"{PREFIX}_{name}", *([VLLM_NAMES[name]] if name in VLLM_NAMES else [])]


def families(model: str, replicas: list[dict[str, Any]], resumed: int = 0) -> list[Metric]:
    """One model's metric families from its replicas' stats, under our names and vLLM's."""
    eng = [r["engine"] for r in replicas]
    req = [r["requests"] for r in replicas]
    total = lambda xs, k: sum(x[k] for x in xs)  # noqa: E731
    out: list[Metric] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]):
        for full in exported(name):
            labels = ["model_name", *samples[0][0]]
            if kind == "counter":  # prometheus_client adds the _total
                family = CounterMetricFamily(full.removesuffix("_total"), help_, labels=labels)
            else:
                family = GaugeMetricFamily(full, help_, labels=labels)
            for labels, value in samples:
                family.add_metric([model, *labels.values()], value)
            out.append(family)

    reasons = sorted({k for r in req for k in r["finished"]}) or ["stop"]
    metric(
        "request_success_total",
        "counter",
        "Finished requests by finish reason.",
        [({"finished_reason": k}, sum(r["finished"].get(k, 0) for r in req)) for k in reasons],
    )
    for name, kind, help_, source, key in SUMMED:
        metric(name, kind, help_, [({}, total(req if source == "requests" else eng, key))])
    used, blocks = total(eng, "kv_blocks_used"), total(eng, "kv_blocks_total")
    queried, hits = total(eng, "prefix_queried_tokens"), total(eng, "prefix_hit_tokens")
    derived = [
        (
            "kv_cache_usage_perc",
            "gauge",
            "Fraction of KV-cache blocks in use (1 = full).",
            used / blocks if blocks else 0.0,
        ),
        (
            "request_resumes_total",
            "counter",
            "Requests sent on to another replica after theirs died (one may need several).",
            resumed,
        ),
        (
            "prefix_cache_hit_rate",
            "gauge",
            "Prefix-cache hits over queries since start.",
            hits / queried if queried else 0.0,
        ),
    ]
    for name, kind, help_, value in derived:
        metric(name, kind, help_, [({}, value)])
    for name, bounds in HISTOGRAMS.items():
        counts = [
            sum(r["hist"].get(name, [0] * (len(bounds) + 1))[i] for r in req)
            for i in range(len(bounds) + 1)
        ]
        cumulative = list(itertools.accumulate(counts))
        buckets = list(zip([*map(str, bounds), "+Inf"], cumulative))
        for full in exported(name):
            family = HistogramMetricFamily(full, "Request latency.", labels=["model_name"])
            family.add_metric([model], buckets, sum(r["sums"].get(name, 0.0) for r in req))
            out.append(family)
    return out


def render(metrics: list[Metric]) -> str:
    """Prometheus text, each family once with every model's samples."""
    merged: dict[str, Metric] = {}
    for m in metrics:
        if m.name in merged:
            merged[m.name].samples.extend(m.samples)
        else:
            merged[m.name] = m

    class Collected:
        def collect(self) -> list[Metric]:
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected())
    return generate_latest(registry).decode()


HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource
STALE_AFTER_S = 60.0  # a replica silent this long is gone: its counters leave the sums too
GAUGES_STALE_AFTER_S = 5.0  # its gauges (running, KV blocks in use) leave the sums at once
ENGINE_GAUGES = [
    key for _, kind, _, source, key in SUMMED if kind == "gauge" and source == "engine"
]


def without_gauges(stats: dict[str, Any]) -> dict[str, Any]:
    return {**stats, "engine": {**stats["engine"], **dict.fromkeys(ENGINE_GAUGES, 0)}}


class MetricsStore:
    """A small Ray actor the LLMServer replicas report to every second, so that any ingress
    replica can render metrics summed over every model replica."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}
        self.resumed: dict[str, int] = {}  # model -> continuations sent after a replica died

    def count_resumed(self, model: str) -> None:
        self.resumed[model] = self.resumed.get(model, 0) + 1

    def report(self, model: str, replica: str, stats: dict[str, Any]) -> None:
        import time

        self.reports.setdefault(model, {})[replica] = (time.monotonic(), stats)

    def engine_stats(self, model: str) -> dict[str, dict[str, float]]:
        """Each live replica's latest engine gauges, by Serve replica id (which replica is busy)."""
        import time

        now = time.monotonic()
        reports = self.reports.get(model, {}).items()
        return {r: s["engine"] for r, (t, s) in reports if now - t < GAUGES_STALE_AFTER_S}

    def render(self) -> str:
        import time

        now = time.monotonic()
        found: list[Metric] = []
        for model, replicas in sorted(self.reports.items()):
            live = [
                s if now - t < GAUGES_STALE_AFTER_S else without_gauges(s)
                for t, s in replicas.values()
                if now - t < STALE_AFTER_S
            ]
            if live:
                found += families(model, live, self.resumed.get(model, 0))
        return render(found)


class ReplicaMetrics:
    """/metrics of an app that one replica serves directly, rendered from that replica's own
    stats: no store actor to report to, so one Ray process less idling on the node. Called
    through a LocalHandle, as the store actor is through its handle; nothing resumes there."""

    def __init__(self, model: str, stats: Callable[[], dict[str, Any]]):
        self.model, self.stats = model, stats

    def render(self) -> str:
        return render(families(self.model, [self.stats()]))


def metrics_store(app_name: str) -> Any:
    """The app's MetricsStore actor, created by whichever replica asks first. It lives on the
    head node, beside Serve's controller, so that losing a worker node loses no metrics."""
    import ray

    actor = ray.remote(num_cpus=0)(MetricsStore)
    return actor.options(
        name=f"llmcluster-metrics-{app_name}",
        get_if_exists=True,
        lifetime="detached",
        resources={HEAD_NODE_RESOURCE: 0.001},
        scheduling_strategy="DEFAULT",  # not inside the asking replica's placement group
    ).remote()
