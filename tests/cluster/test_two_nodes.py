"""A real two-node Ray cluster on this host (a head raylet and a second raylet, started by Ray's
cluster_utils, one CPU each; an LLMServer replica takes one, so each node holds one): Serve
autoscaling out to the second node under load and back when idle, streams that survive a killed
replica, and prefix-affinity routing. Every load loop is bounded in count and time; loopback only.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from model_parallel.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from serving.config import AppConfig, ModelDeployment
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow

MODEL = "smol"
DEPLOYMENT = f"LLMServer:{MODEL}"
# Serve's replicas and handles push autoscaling metrics every 10 s by default: too slow here.
FAST_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in FAST_METRICS}
    os.environ.update(FAST_METRICS)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        # One proxy: both raylets share this host's address, so proxies on each would collide.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def deploy(name: str, url: str, **deployment: Any) -> None:
    from ray import serve

    from cluster.launch import wait_healthy
    from serving.app import build_app

    engine = EngineConfig(
        model=ModelConfig(dtype="float32"),  # greedy runs are compared token for token
        cache=CacheConfig(kv_cache_memory_gib=0.25),
        scheduler=SchedulerConfig(max_num_seqs=8),
    )
    model = ModelDeployment(
        engine=engine, served_model_name=MODEL, cpus_per_replica=1, **deployment
    )
    serve.run(build_app(AppConfig(models=(model,), name=name)), name=name, route_prefix="/")
    wait_healthy(url, 300)


def replicas(app: str) -> dict[str, tuple[str, int]]:
    """The app's live LLMServer replica actors: name -> (node id, pid)."""
    import ray

    def where(_: Any) -> tuple[str, int]:
        import os

        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    found = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and f"{app}#{DEPLOYMENT}#" in a["name"]:
            actor = ray.get_actor(a["name"], namespace="serve")
            try:
                found[a["name"]] = ray.get(actor.__ray_call__.remote(where), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # leaving or gone
    return found


def running_replicas(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[DEPLOYMENT].replica_states
    return states.get("RUNNING", 0)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)


async def chat(
    url: str, content: str, max_tokens: int, progress: Callable[[], None] | None = None
) -> dict[str, Any]:
    """One streamed greedy chat; its text, finish reason and usage (raises on any failure)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # the same length on every run
    )
    text, reason, usage, chunks = "", None, None, 0
    async for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        if progress is not None:
            progress()
    await client.close()
    assert reason in ("stop", "length"), reason
    return {"text": text, "finish_reason": reason, "completion_tokens": usage}


async def load(url: str, concurrency: int, until: Callable[[], bool], timeout_s: float) -> int:
    """`concurrency` clients send requests back to back until `until()` holds; returns how many
    finished. Any failed request fails the test."""
    stop = asyncio.Event()
    done = 0

    async def client(i: int) -> None:
        nonlocal done
        while not stop.is_set():
            await chat(url, f"Count from {i} to {i + 20}.", 24)
            done += 1

    async def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(until):
            assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s"
            await asyncio.sleep(0.5)
        stop.set()

    await asyncio.gather(watch(), *(client(i) for i in range(concurrency)))
    return done


def test_autoscaling_goes_out_to_the_second_node_and_back_without_failures(url: str) -> None:
    from ray import serve

    deploy(
        "scaling",
        url,
        graceful_shutdown_timeout_s=60,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
        },
    )
    assert running_replicas("scaling") == 1
    # Under load (6 clients for a target of 2 per replica): out to the second node.
    up = asyncio.run(load(url, 6, lambda: running_replicas("scaling") == 2, 150))
    nodes = {node for node, _ in replicas("scaling").values()}
    assert len(nodes) == 2, "the two replicas should sit on the two nodes"
    # A trickle stays under the target: back to one replica, while requests keep finishing
    # (the leaving replica drains its streams first).
    down = asyncio.run(load(url, 1, lambda: running_replicas("scaling") == 1, 120))
    assert up > 0 and down > 0
    serve.delete("scaling")


@pytest.fixture(scope="module")
def two_replicas(url: str) -> Iterator[str]:
    from ray import serve

    deploy("fixed", url, num_replicas=2)
    assert len({node for node, _ in replicas("fixed").values()}) == 2
    yield url
    serve.delete("fixed")


def test_prefix_affinity_routes_a_shared_prompt_to_the_replica_that_caches_it(
    two_replicas: str,
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{two_replicas}/v1", api_key="none", max_retries=0, timeout=120)
    topics = ["astronomy", "cooking", "sailing", "chess", "gardening", "music"]
    systems = [
        f"You are an expert on {t}. "
        + " ".join(f"Rule {i}: be precise about {t}." for i in range(20))
        for t in topics
    ]
    cached = prompt = 0
    for round_ in range(4):
        for system in systems:
            r = client.chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Question {round_}: say hello."},
                ],
                max_tokens=2,
                temperature=0,
            )
            if round_ > 0:  # a repeat of a system prompt: its blocks are cached somewhere
                cached += r.usage.prompt_tokens_details.cached_tokens
                prompt += r.usage.prompt_tokens
    # Each repeat's system prompt is ~85% of its tokens; with random routing across two
    # replicas about half the repeats would miss (a hit rate near 0.45).
    assert cached / prompt > 0.75, f"prefix-cache hit rate {cached / prompt:.2f}"


def test_streams_survive_a_killed_replica_token_for_token(two_replicas: str) -> None:
    url = two_replicas
    topics = ["a cat", "the sea", "a robot", "a king", "rain", "Mars"]
    prompts = [f"Write a long story about {t}." for t in topics]

    async def undisturbed() -> list[dict[str, Any]]:
        return await asyncio.wait_for(asyncio.gather(*(chat(url, p, 96) for p in prompts)), 180)

    reference = asyncio.run(undisturbed())
    victim_name, (_, victim_pid) = sorted(replicas("fixed").items())[0]
    chunks = [0] * len(prompts)

    def counter(i: int) -> Callable[[], None]:
        def tick() -> None:
            chunks[i] += 1

        return tick

    async def disturbed() -> list[dict[str, Any]]:
        tasks = [asyncio.ensure_future(chat(url, p, 96, counter(i))) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 60
        while min(chunks) < 8:  # every stream is under way
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        os.kill(victim_pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 180)

    results = asyncio.run(disturbed())
    assert results == reference
    metrics = httpx.get(f"{url}/metrics").text
    resumed = re.search(r"^llmcluster_request_resumes_total\{[^}]*\} (\d+)", metrics, re.M)
    assert resumed and int(resumed.group(1)) >= 1, "no stream was on the killed replica"
    # Serve replaces the replica.
    wait_for(
        "a replacement replica",
        lambda: running_replicas("fixed") == 2 and victim_name not in replicas("fixed"),
        180,
    )
