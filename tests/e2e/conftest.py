"""A real Ray Serve app on loopback, started once for the e2e package, with an API key; a second
ingress without a key ("/open", greedy by default) shares the same LLMServer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from cluster.launch import free_port
from model_parallel.config import CacheConfig, EngineConfig, SchedulerConfig
from model_parallel.loader import DEFAULT_MODEL
from serving.config import AppConfig, ModelDeployment, ServerSettings

API_KEY = "test-key-123"
MODEL = "smollm2"


@pytest.fixture(scope="package")
def server() -> Iterator[str]:
    import ray
    from ray import serve

    from cluster.launch import apply_serve_env, deploy, shutdown
    from serving.ingress import OpenAIIngress

    engine = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gib=0.5), scheduler=SchedulerConfig(max_num_seqs=64)
    )
    model = ModelDeployment(engine=engine, served_model_name=MODEL, max_queued_requests=64)
    config = AppConfig(
        models=(model,), server=ServerSettings(api_key=API_KEY, max_body_bytes=1 << 20)
    )
    apply_serve_env()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:  # a failed start shuts down too, so the next package's Ray starts clean
        port = free_port()
        url = deploy(config, "127.0.0.1", port, None)
        handle = serve.get_deployment_handle(f"LLMServer:{MODEL}", app_name=config.name)
        # The keyless ingress answers greedily, with a mild repetition penalty, where a request
        # leaves them out (an operator's --override-generation-config): the seed's examples,
        # which set neither, then give the same answer on every run.
        greedy = dataclasses.replace(
            model, generation_config={"temperature": 0.0, "repetition_penalty": 1.1}
        )
        open_config = AppConfig(models=(greedy,), server=ServerSettings(), name="open")
        serve.run(
            OpenAIIngress.bind(open_config, {MODEL: handle}), name="open", route_prefix="/open"
        )
        yield url
    finally:
        shutdown()


@pytest.fixture(scope="package")
def client(server: str):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="package")
def aclient(server: str):  # noqa: ANN201
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)


__all__ = ["API_KEY", "DEFAULT_MODEL", "MODEL"]
