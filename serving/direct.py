"""Direct streaming: an app of one model on one replica serves HTTP from the model replica itself
(as Ray Serve LLM does for such apps). Each streamed token then crosses one Serve hop (proxy to
replica) instead of two (proxy to ingress to LLMServer): on two cores that CPU is the engine's.

Nothing that needs a second replica is lost: prefix-affinity routing, resumption elsewhere and
scaling only mean something with more than one, and such apps keep the separate ingress."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from model_parallel.config import EngineConfig
from model_parallel.request import RequestOutput
from serving.config import AppConfig
from serving.ingress import OpenAIIngress
from serving.llm_server import LLMServer
from serving.local_handle import LocalHandle
from serving.metrics import ReplicaMetrics


@serve.deployment
class OpenAIServer(OpenAIIngress.func_or_class):
    """The OpenAI routes and the model replica in one Serve replica."""

    async def __init__(self, config: AppConfig, engine_config: EngineConfig, num_threads: int):
        (m,) = config.models
        # The LLMServer deployment's max_ongoing + max_queued_requests, counted by the server.
        queued = m.max_queued_requests
        limit = None if queued < 0 else engine_config.scheduler.max_num_seqs + queued
        self.server = LLMServer(engine_config, m.name, None, num_threads, m.stream_interval, limit)
        metrics = LocalHandle(ReplicaMetrics(m.name, self.server.stats))
        await super().__init__(config, {m.name: LocalHandle(self.server)}, metrics)

    # What another app's handle to this deployment calls (this replica's routes go straight to
    # self.server), and Serve's health check.
    async def generate(self, *args: Any) -> AsyncIterator[RequestOutput]:
        """LLMServer.generate's arguments."""
        async for out in self.server.generate(*args):
            yield out

    def info(self) -> dict[str, Any]:
        return self.server.info()

    def check_health(self) -> None:
        self.server.check_health()
