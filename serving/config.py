"""What a served application is made of: one config object, built from CLI flags or a Serve YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model_parallel.config import EngineConfig


@dataclass(frozen=True, slots=True)
class ServerSettings:
    api_key: str | None = None  # None: no key; else every route but /health needs it
    max_body_bytes: int = 8 << 20
    max_header_count: int = 64
    max_header_bytes: int = 16 << 10
    allow_request_chat_template: bool = False
    template_timeout_s: float = 5.0
    max_n: int = 16


@dataclass(frozen=True, slots=True)
class ModelDeployment:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None  # None: the --model string
    num_replicas: int = 1
    autoscaling_config: dict[str, Any] | None = None  # Serve's; replaces num_replicas
    max_queued_requests: int = 256  # beyond it, a 503 with Retry-After
    cpus_per_replica: int | None = None  # None: every core of the node on CPU, 1 with GPUs or TP

    @property
    def name(self) -> str:
        return self.served_model_name or self.engine.model.model


@dataclass(frozen=True, slots=True)
class AppConfig:
    models: tuple[ModelDeployment, ...] = (ModelDeployment(),)
    server: ServerSettings = field(default_factory=ServerSettings)
    ingress_replicas: int = 1
    name: str = "llmcluster"
