"""The LLMServer deployment: one model replica owning one AsyncEngine (and, with tensor
parallelism, the workers in its placement group)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.serve.exceptions import BackPressureError

from model_parallel.async_engine import AsyncEngine, ProcessEngine
from model_parallel.config import EngineConfig
from model_parallel.request import RequestOutput, SamplingParams, coalesce
from serving.autoscaling import KV_USAGE, RUNNING, WAITING
from serving.metrics import EngineMetrics, metrics_store

REPORT_PERIOD_S = 1.0


async def every_n_tokens(
    outputs: AsyncIterator[RequestOutput], interval: int
) -> AsyncIterator[RequestOutput]:
    """The first output at once (time to first token), then one per `interval` tokens of its
    longest choice, and the finished one (the engine's stream ends with it): each item through
    Serve costs CPU in this replica, the ingress and the proxy, whatever it carries."""
    held: RequestOutput | None = None
    sent_first = False
    async for out in outputs:
        held = out if held is None else coalesce(held, out)
        longest = max((len(c.token_ids) for c in held.outputs), default=0)
        if not sent_first or longest >= interval or held.finished:
            sent_first = True
            yield held
            held = None


class Admission:
    """A limit on generation requests in flight, where no Serve router in front keeps one (the
    direct-streaming replica: there /health, /metrics and /v1/models must not wait behind it)."""

    def __init__(self, limit: int | None):
        self.limit, self.ongoing = limit, 0

    def __enter__(self) -> None:
        if self.limit is not None and self.ongoing >= self.limit:
            raise BackPressureError(
                num_queued_requests=self.ongoing, max_queued_requests=self.limit
            )
        self.ongoing += 1

    def __exit__(self, *_: object) -> None:
        self.ongoing -= 1


class LLMServer:
    def __init__(
        self,
        engine_config: EngineConfig,
        model_name: str,
        app_name: str | None,
        num_threads: int = 1,
        stream_interval: int = 1,
        max_requests: int | None = None,
    ):
        torch.set_num_threads(num_threads)
        self.stream_interval = stream_interval
        self.admission = Admission(max_requests)
        # One rank: the engine gets a process of its own, away from this replica's GIL. With
        # tensor parallelism, rank 0 stays here, inside the placement group Serve made for it.
        tp = engine_config.parallel.tensor_parallel_size
        self.engine = ProcessEngine(engine_config) if tp == 1 else AsyncEngine(engine_config)
        self.metrics = EngineMetrics()
        if app_name is not None:  # None: the replica serves the app itself and renders /metrics
            replica = serve.get_replica_context().replica_id.unique_id
            args = (model_name, app_name, replica)
            threading.Thread(
                target=self._report, args=args, name="metrics-report", daemon=True
            ).start()

    def _report(self, model_name: str, app_name: str, replica: str) -> None:
        store = metrics_store(app_name)
        while not self.engine.stopped:
            store.report.remote(model_name, replica, self.stats())
            time.sleep(REPORT_PERIOD_S)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; Serve cancels it (and so aborts it) when the client
        goes away. `output_token_ids` continues a request whose replica died."""
        start = time.monotonic()
        first: float | None = None
        last: RequestOutput | None = None
        # NOTE: outputs that pile up are already coalesced by the engine front end.
        outputs = self.engine.generate(request_id, prompt_token_ids, params, output_token_ids)
        if self.stream_interval > 1:
            outputs = every_n_tokens(outputs, self.stream_interval)
        with self.admission:
            async for out in outputs:
                if first is None:
                    first = time.monotonic()
                last = out
                yield out
        if last is not None and first is not None:
            self.metrics.observe_request(last, start, first, time.monotonic())

    def info(self) -> dict[str, Any]:
        limits = self.engine.limits
        return {
            "max_model_len": limits.max_model_len,
            "vocab_size": limits.vocab_size,
            "created": int(time.time()),
        }

    def stats(self) -> dict[str, Any]:
        """This replica's engine gauges and request metrics, for /metrics."""
        return {"engine": self.engine.stats(), "requests": self.metrics.snapshot()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What LLMAutoscalingPolicy reads besides the request count (Serve calls it)."""
        e = self.engine.stats()
        return {
            RUNNING: e["num_running"],
            WAITING: e["num_waiting"],
            KV_USAGE: e["kv_blocks_used"] / max(e["kv_blocks_total"], 1),
        }

    def check_health(self) -> None:
        """Serve's health check: raises (so Serve replaces the replica) when the engine loop or a
        tensor-parallel rank is dead."""
        self.engine.check_health()

    def __del__(self) -> None:
        self.engine.shutdown()
