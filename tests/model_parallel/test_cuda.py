"""The engine on one CUDA device: greedy parity with HuggingFace. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch

from model_parallel.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    blocks_for_budget,
    kv_bytes_per_token,
)
from model_parallel.engine import LLMEngine
from model_parallel.request import SamplingParams
from tests.conftest import SMALL_KV_GIB, hf_greedy, run_all, tokens_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_fp32_greedy_matches_hf(hf_model, prompts) -> None:  # noqa: ANN001
    e = LLMEngine(
        EngineConfig(
            model=ModelConfig(dtype="float32"),
            cache=CacheConfig(kv_cache_memory_gib=SMALL_KV_GIB),
            parallel=ParallelConfig(device="cuda"),
        )
    )
    out = run_all(
        e,
        {
            f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=16))
            for i, p in enumerate(prompts)
        },
    )
    for i, p in enumerate(prompts):
        assert tokens_of(out[f"r{i}"]) == hf_greedy(hf_model, p, 16)


def cuda_engine(**cache: float) -> LLMEngine:
    return LLMEngine(
        EngineConfig(cache=CacheConfig(**cache), parallel=ParallelConfig(device="cuda"))
    )


def test_cuda_kv_budget_explicit_or_from_free_memory() -> None:
    """An explicit budget sizes the pool on CUDA too; without one the pool takes what the device
    has free, including memory a shut-down engine's tensors left in torch's allocator cache."""
    small = cuda_engine(kv_cache_memory_gib=0.25)
    runner = small.runner
    per_token = kv_bytes_per_token(
        runner.arch, runner.model.layers[0].self_attn.num_kv_heads, runner.dtype
    )
    assert small.block_manager.num_blocks == blocks_for_budget(0.25 * 2**30, 16, per_token)
    small.shutdown()
    free, total = torch.cuda.mem_get_info()
    sizes = []
    for _ in range(2):
        e = cuda_engine()
        sizes.append(e.block_manager.num_blocks)
        e.shutdown()
        del e  # else it is still alive while the next one measures free memory
    # most of what the default 0.9 of the device leaves (the engine's weights take the rest)
    assert sizes[0] * 16 * per_token >= 0.5 * (0.9 * total - (total - free))
    assert sizes[1] >= 0.95 * sizes[0]
