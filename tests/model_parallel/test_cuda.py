"""The engine on one CUDA device: greedy parity with HuggingFace. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch

from model_parallel.config import EngineConfig, ModelConfig, ParallelConfig
from model_parallel.engine import LLMEngine
from model_parallel.request import SamplingParams
from tests.conftest import hf_greedy, run_all, tokens_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_fp32_greedy_matches_hf(hf_model, prompts) -> None:  # noqa: ANN001
    e = LLMEngine(
        EngineConfig(model=ModelConfig(dtype="float32"), parallel=ParallelConfig(device="cuda"))
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
