"""Request metrics in Prometheus' text format, summed across every LLMServer replica."""

from __future__ import annotations

import bisect
from typing import Any

from model_parallel.request import RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HISTOGRAMS = {
    "time_to_first_token_seconds": TTFT_BUCKETS,
    "time_per_output_token_seconds": TPOT_BUCKETS,
    "e2e_request_latency_seconds": E2E_BUCKETS,
}
PREFIX = "llmcluster"
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

    def _observe(self, name: str, value: float) -> None:
        self.hist[name][bisect.bisect_left(HISTOGRAMS[name], value)] += 1
        self.sums[name] += value

    def observe_request(self, last: RequestOutput, start: float, first: float, end: float) -> None:
        for c in last.outputs:
            reason = c.finish_reason or "abort"
            self.finished[reason] = self.finished.get(reason, 0) + 1
        self.prompt_tokens += last.num_prompt_tokens
        self.generation_tokens += last.num_output_tokens
        self._observe("time_to_first_token_seconds", first - start)
        self._observe("e2e_request_latency_seconds", end - start)
        if last.num_output_tokens > 1:
            self._observe(
                "time_per_output_token_seconds", (end - first) / (last.num_output_tokens - 1)
            )

    def snapshot(self) -> dict[str, Any]:
        return {
            "finished": dict(self.finished),
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "hist": {k: list(v) for k, v in self.hist.items()},
            "sums": dict(self.sums),
        }


def render(model: str, replicas: list[dict[str, Any]], resumed: int = 0) -> str:
    """Prometheus text for one model from its replicas' stats."""
    lbl = f'model_name="{model}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {PREFIX}_{name} {help_}")
        lines.append(f"# TYPE {PREFIX}_{name} {kind}")
        lines.extend(f"{PREFIX}_{name}{{{labels}}} {value}" for labels, value in samples)

    eng = [r["engine"] for r in replicas]
    req = [r["requests"] for r in replicas]
    total = lambda xs, k: sum(x[k] for x in xs)  # noqa: E731
    reasons = sorted({k for r in req for k in r["finished"]})
    metric(
        "request_success_total",
        "counter",
        "Finished requests by finish reason.",
        [
            (f'{lbl},finished_reason="{k}"', sum(r["finished"].get(k, 0) for r in req))
            for k in reasons
        ],
    )
    for name, kind, help_, source, key in SUMMED:
        metric(name, kind, help_, [(lbl, total(req if source == "requests" else eng, key))])
    metric(
        "request_resumes_total",
        "counter",
        "Requests sent on to another replica after theirs died (one may need several).",
        [(lbl, resumed)],
    )
    queried, hits = total(eng, "prefix_queried_tokens"), total(eng, "prefix_hit_tokens")
    metric(
        "prefix_cache_hit_rate",
        "gauge",
        "Prefix-cache hits over queries since start.",
        [(lbl, hits / queried if queried else 0.0)],
    )
    for name, buckets in HISTOGRAMS.items():
        counts = [sum(r["hist"][name][i] for r in req) for i in range(len(buckets) + 1)]
        samples, running = [], 0
        for bound, count in zip([*map(str, buckets), "+Inf"], counts):
            running += count
            samples.append((f'{lbl},le="{bound}"', running))
        lines.append(f"# HELP {PREFIX}_{name} Request latency.")
        lines.append(f"# TYPE {PREFIX}_{name} histogram")
        lines.extend(f"{PREFIX}_{name}_bucket{{{lb}}} {v}" for lb, v in samples)
        lines.append(f"{PREFIX}_{name}_sum{{{lbl}}} {sum(r['sums'][name] for r in req)}")
        lines.append(f"{PREFIX}_{name}_count{{{lbl}}} {running}")
    return "\n".join(lines) + "\n"


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
        parts = []
        for model, replicas in sorted(self.reports.items()):
            live = [
                s if now - t < GAUGES_STALE_AFTER_S else without_gauges(s)
                for t, s in replicas.values()
                if now - t < STALE_AFTER_S
            ]
            if live:
                parts.append(render(model, live, self.resumed.get(model, 0)))
        return "".join(parts)


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
