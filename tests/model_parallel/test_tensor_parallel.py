"""Tensor parallelism on CPU (gloo): a tiny random Llama at TP=1/2/4, the default model at TP=3
against HuggingFace, batching/preemption/aborts at TP=2, and a killed worker."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import torch

from model_parallel.async_engine import AsyncEngine
from model_parallel.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from model_parallel.engine import EngineDeadError, LLMEngine
from model_parallel.request import SamplingParams
from tests.conftest import assert_pool_full, hf_greedy, run_all, tokens_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():  # noqa: ANN201
    import ray

    ray.init(address="local", num_cpus=8, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, model_path: Path) -> Path:
    """A random Llama with 4 query heads and 2 KV heads, and the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    for f in model_path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return path


def config(model: str, tp: int, **cache: object) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=model, dtype="float32"),
        cache=CacheConfig(kv_cache_memory_gib=0.1, **cache),
        scheduler=SchedulerConfig(max_num_batched_tokens=64),
        parallel=ParallelConfig(tensor_parallel_size=tp, collective_timeout_s=20),
    )


def engine(model: str, tp: int, **cache: object) -> LLMEngine:
    return LLMEngine(config(model, tp, **cache))


def greedy(n: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, logprobs=logprobs, ignore_eos=True)


def test_tiny_model_same_logits_and_tokens_at_tp_1_2_4(tiny_model: Path, prompts) -> None:  # noqa: ANN001
    reqs = {f"r{i}": (p, greedy(12, logprobs=5)) for i, p in enumerate(prompts[:4])}
    results = {}
    for tp in (1, 2, 4):  # at 4, each of the 2 KV heads is replicated on two ranks
        e = engine(str(tiny_model), tp)
        try:
            results[tp] = run_all(e, reqs, {i: [f"r{i}"] for i in range(4)})
        finally:
            e.shutdown()
    for rid in reqs:
        base = results[1][rid]
        for tp in (2, 4):
            assert tokens_of(results[tp][rid]) == tokens_of(base)
            ours = [lp for o in results[tp][rid] for c in o.outputs for lp in c.logprobs]
            ref = [lp for o in base for c in o.outputs for lp in c.logprobs]
            for a, b in zip(ours, ref):
                assert [t.token_id for t in a.top] == [t.token_id for t in b.top]
                assert max(abs(x.logprob - y.logprob) for x, y in zip(a.top, b.top)) < 1e-4


def test_default_model_tp3_matches_hf(hf_model, prompts) -> None:  # noqa: ANN001
    e = engine("HuggingFaceTB/SmolLM2-135M-Instruct", 3)
    try:
        reqs = {
            f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=16))
            for i, p in enumerate(prompts)
        }
        out = run_all(e, reqs)
    finally:
        e.shutdown()
    for i, p in enumerate(prompts):
        assert tokens_of(out[f"r{i}"]) == hf_greedy(hf_model, p, 16), f"prompt {i}"


def test_batching_preemption_and_aborts_at_tp2(tiny_model: Path, prompts) -> None:  # noqa: ANN001
    e = engine(str(tiny_model), 2, num_blocks=10, enable_prefix_caching=False)
    try:
        reqs = {f"r{i}": (p, greedy(20)) for i, p in enumerate(prompts[:6])}
        run_all(e, reqs, {i: [f"r{i}"] for i in range(6)})
        assert e.scheduler.num_preemptions > 0
        for i, p in enumerate(prompts[:3]):
            e.add_request(f"a{i}", p, greedy(30))
        for _ in range(4):
            e.step()
        for i in range(3):
            e.abort_request(f"a{i}")
        assert_pool_full(e)
    finally:
        e.shutdown()


def test_indivisible_sizes_name_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"not divisible by tensor_parallel_size 2.*\[1, 3, 9\]"):
        engine("HuggingFaceTB/SmolLM2-135M-Instruct", 2)


def test_killed_worker_fails_requests_and_health_not_hangs(tiny_model: Path, prompts) -> None:  # noqa: ANN001
    import ray

    async_engine = AsyncEngine(config(str(tiny_model), 2))

    async def stream() -> None:
        async for out in async_engine.generate("k", prompts[0], greedy(400)):
            if out.num_output_tokens == 3:
                ray.kill(async_engine.engine.workers.actors[0])

    start = time.monotonic()
    try:
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(stream(), timeout=60))
        assert time.monotonic() - start < 60
        with pytest.raises(Exception):  # noqa: B017 - dead loop or dead worker, either is unhealthy
            async_engine.check_health()
    finally:
        async_engine.shutdown()


cuda_pair = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


@cuda_pair
def test_cuda_nccl_tp2_matches_tp1(tiny_model: Path, prompts) -> None:  # noqa: ANN001
    outs = {}
    for tp in (1, 2):
        e = LLMEngine(
            EngineConfig(
                model=ModelConfig(model=str(tiny_model), dtype="float32"),
                parallel=ParallelConfig(tensor_parallel_size=tp, device="cuda"),
            )
        )
        try:
            outs[tp] = run_all(e, {"r": (prompts[0], greedy(12))})["r"]
        finally:
            e.shutdown()
    assert tokens_of(outs[1]) == tokens_of(outs[2])
