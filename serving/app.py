"""build_app(config): the ingress bound to one LLMServer deployment per model. Used by
`llmcluster serve` and by `serve run`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serving.autoscaling import LLMAutoscalingPolicy
from serving.config import AppConfig, ModelDeployment, config_from_dict
from serving.direct import OpenAIServer
from serving.ingress import OpenAIIngress
from serving.llm_server import LLMServer
from serving.router import PrefixAffinityRouter

INGRESS_MAX_ONGOING = 2048


def replica_options(m: ModelDeployment) -> dict[str, Any]:
    """What a model replica asks of Serve, whether it is an LLMServer or serves directly."""
    return {
        "name": deployment_name(m),
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        # A replica that leaves (scale-down, redeploy) gets no new requests and finishes its
        # streams for up to this long.
        "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": m.replica_cpus(), "num_gpus": 1 if m.uses_gpu else 0},
    }


def deployment_name(m: ModelDeployment) -> str:
    """The model's deployment, by which another app gets a handle to it."""
    return f"LLMServer:{m.name}".replace("/", "--")


def llm_deployment(m: ModelDeployment, app_name: str) -> Application:
    par = m.engine.parallel
    bundle = {"CPU": 1, "GPU": 1} if m.uses_gpu else {"CPU": 1}
    options = replica_options(m) | {
        "max_ongoing_requests": m.engine.scheduler.max_num_seqs,
        "max_queued_requests": m.max_queued_requests,
        # Prompts that share a prefix go where it is cached, unless that replica is much busier.
        "request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter),
    }
    if par.tensor_parallel_size > 1:  # rank 0 (the replica) takes bundle 0, workers the rest
        options["placement_group_bundles"] = [bundle] * par.tensor_parallel_size
        options["placement_group_strategy"] = "STRICT_PACK"
    if m.autoscaling_config:
        # Serve's default target of 2 ongoing requests would scale out a replica that batches
        # max_num_seqs sequences long before it is busy: aim at half its batch unless told.
        # The policy also scales on the engines' waiting queues and KV-cache usage.
        target = max(1, m.engine.scheduler.max_num_seqs // 2)
        options["autoscaling_config"] = {
            "target_ongoing_requests": target,
            "policy": {"policy_function": LLMAutoscalingPolicy},
            **m.autoscaling_config,
        }
    else:
        options["num_replicas"] = m.num_replicas
    return (
        serve.deployment(LLMServer)
        .options(**options)
        .bind(m.engine, m.name, app_name, m.replica_cpus(), m.stream_interval)
    )


def build_app(config: AppConfig) -> Application:
    if config.serves_directly:
        (m,) = config.models
        options = replica_options(m) | {"max_ongoing_requests": INGRESS_MAX_ONGOING}
        return OpenAIServer.options(**options).bind(config, m.engine, m.replica_cpus())
    handles = {m.name: llm_deployment(m, config.name) for m in config.models}
    # The ingress only waits on streams: Serve's default of 5 requests in flight would queue them.
    scale: dict[str, Any] = {"num_replicas": config.ingress_replicas}
    if config.ingress_autoscaling_config:  # the ingress scales on its own, apart from the models
        scale = {"autoscaling_config": config.ingress_autoscaling_config}
    actor = {"num_cpus": 0, "resources": config.ingress_resources or {}}
    return OpenAIIngress.options(
        max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options=actor, **scale
    ).bind(config, handles)


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run configs/default.yaml` imports this (import_path: serving.app:app_builder)."""
    return build_app(config_from_dict(args or {}))
