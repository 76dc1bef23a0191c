"""What a served application is made of: one config object, built from CLI flags or a Serve YAML."""

from __future__ import annotations

import os
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


GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True, slots=True)
class ModelDeployment:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None  # None: the --model string
    num_replicas: int = 1
    autoscaling_config: dict[str, Any] | None = None  # Serve's; replaces num_replicas
    max_queued_requests: int = 256  # beyond it, a 503 with Retry-After
    # None: on CPU, the machine's cores shared by the replicas it may hold at once (num_replicas,
    # or autoscaling's max_replicas); 1 with GPUs or tensor parallelism (a bundle per rank).
    cpus_per_replica: int | None = None
    # Sampling defaults for the fields a request leaves out, over the model's own
    # generation_config.json (vLLM's --override-generation-config), e.g. {"temperature": 0.2}.
    generation_config: dict[str, float] | None = None
    graceful_shutdown_timeout_s: float = 300.0  # how long a leaving replica finishes its streams
    # Tokens per streamed item after the first (vLLM's --stream-interval): fewer, larger items
    # cost the replica, ingress and proxy less CPU, at the price of burstier deltas.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.cpus_per_replica is not None and self.cpus_per_replica < 1:
            raise ValueError(f"cpus_per_replica must be >= 1, got {self.cpus_per_replica}")
        unknown = set(self.generation_config or {}) - set(GENERATION_DEFAULT_KEYS)
        if unknown:
            raise ValueError(
                f"generation_config may set {', '.join(GENERATION_DEFAULT_KEYS)}; "
                f"not {', '.join(sorted(unknown))}"
            )

    @property
    def name(self) -> str:
        return self.served_model_name or self.engine.model.model

    @property
    def initial_replicas(self) -> int:
        scale = self.autoscaling_config
        if scale is None:
            return self.num_replicas
        return scale.get("initial_replicas") or scale.get("min_replicas", 1)

    @property
    def max_replicas(self) -> int:
        scale = self.autoscaling_config
        return self.num_replicas if scale is None else scale.get("max_replicas", 1)

    @property
    def uses_gpu(self) -> bool:
        return self.engine.parallel.torch_device().type == "cuda"

    def replica_cpus(self) -> int:
        """The CPUs a replica asks Ray for, which are also its matmul threads on CPU: two
        replicas that each ask for every core of a node would leave the second pending."""
        if self.cpus_per_replica is not None:
            return self.cpus_per_replica
        if self.uses_gpu or self.engine.parallel.tensor_parallel_size > 1:
            return 1
        return max(1, (os.cpu_count() or 1) // max(1, self.max_replicas))

    def replica_resources(self) -> dict[str, float]:
        """What one replica takes from one node: its placement group's bundles, or its actor."""
        tp = self.engine.parallel.tensor_parallel_size
        cpus = tp if tp > 1 else self.replica_cpus()
        return {"CPU": cpus, "GPU": tp} if self.uses_gpu else {"CPU": cpus}


@dataclass(frozen=True, slots=True)
class AppConfig:
    models: tuple[ModelDeployment, ...] = (ModelDeployment(),)
    server: ServerSettings = field(default_factory=ServerSettings)
    ingress_replicas: int = 1
    ingress_autoscaling_config: dict[str, Any] | None = None  # Serve's; replaces ingress_replicas
    # Ray resources each ingress replica needs, to place it: e.g. {"node:__internal_head__": 0.01}
    # keeps it on the head node, a custom resource on CPU-only nodes.
    ingress_resources: dict[str, float] | None = None
    name: str = "llmcluster"
    # One model on one single-rank replica, with one ingress: serve HTTP from that replica
    # (serving/direct.py). False keeps the separate ingress deployment.
    direct_streaming: bool = True

    @property
    def serves_directly(self) -> bool:
        if not self.direct_streaming or len(self.models) != 1:
            return False
        (m,) = self.models
        return (
            m.autoscaling_config is None
            and m.num_replicas == 1
            and m.engine.parallel.tensor_parallel_size == 1
            and self.ingress_replicas == 1
            and self.ingress_autoscaling_config is None
            and self.ingress_resources is None
        )


_MODEL_KEYS = {
    "model",
    "served_model_name",
    "dtype",
    "quantization",
    "max_model_len",
    "tensor_parallel_size",
    "device",
    "kv_cache_memory_gib",
    "gpu_memory_utilization",
    "block_size",
    "enable_prefix_caching",
    "max_num_seqs",
    "max_num_batched_tokens",
}
_DEPLOYMENT_KEYS = tuple(k for k in ModelDeployment.__dataclass_fields__ if k != "engine")
_MODEL_KEYS |= set(_DEPLOYMENT_KEYS)
_SERVER_KEYS = set(ServerSettings.__dataclass_fields__)
_APP_KEYS = tuple(k for k in AppConfig.__dataclass_fields__ if k not in ("models", "server"))


def _model_from_dict(d: dict[str, Any]) -> ModelDeployment:
    from model_parallel.config import (
        CacheConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )

    unknown = set(d) - _MODEL_KEYS
    if unknown:
        raise ValueError(f"unknown model keys {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}")

    def pick(cls: type, **rename: str) -> Any:
        fields = cls.__dataclass_fields__
        return cls(**{k: d[rename.get(k, k)] for k in fields if rename.get(k, k) in d})

    engine = EngineConfig(
        model=pick(ModelConfig),
        cache=pick(CacheConfig),
        scheduler=pick(SchedulerConfig),
        parallel=pick(ParallelConfig),
    )
    return ModelDeployment(engine=engine, **{k: d[k] for k in _DEPLOYMENT_KEYS if k in d})


def config_from_dict(d: dict[str, Any]) -> AppConfig:
    """A Serve YAML application's `args` (or `llmcluster serve --config`) -> AppConfig."""
    known = {"models", *_APP_KEYS} | _SERVER_KEYS
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
    models = tuple(_model_from_dict(m) for m in d.get("models") or [{}])
    server = ServerSettings(**{k: d[k] for k in _SERVER_KEYS if k in d})
    return AppConfig(models=models, server=server, **{k: d[k] for k in _APP_KEYS if k in d})
