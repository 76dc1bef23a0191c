"""Shared fixtures: the default model on disk, a HuggingFace reference, and engines built on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from model_parallel.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from model_parallel.engine import LLMEngine
from model_parallel.layers import cpu_kernels
from model_parallel.loader import DEFAULT_MODEL, resolve_model_path

# 5k+ tokens: plenty, light on the CI box, and on a GPU the same whatever else holds memory
SMALL_KV_GIB = 0.25

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to program.",
    "What is 12 times 7?",
]


@pytest.fixture(autouse=True)
def _kernel_setting_per_test() -> Iterator[None]:
    """LLMCLUSTER_CPU_KERNELS is read once per process: each test starts from the environment's
    (torn down after monkeypatch has restored it)."""
    cpu_kernels.setting.cache_clear()
    yield
    cpu_kernels.setting.cache_clear()


@pytest.fixture
def use_kernels(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Sets LLMCLUSTER_CPU_KERNELS for the rest of the test."""

    def use(choice: str) -> None:
        monkeypatch.setenv("LLMCLUSTER_CPU_KERNELS", choice)
        cpu_kernels.setting.cache_clear()

    return use


@pytest.fixture(params=["amx", "avx512", "avx2"])
def kernel_isa(request: pytest.FixtureRequest, use_kernels: Callable[[str], None]) -> str:
    """Each CPU kernel set in turn, where this CPU has it: the AVX2 one runs on AVX512 CPUs too."""
    isa = request.param
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU lacks the {isa} instruction set")
    if cpu_kernels.library(isa) is None:
        pytest.skip("no C compiler")
    use_kernels(isa)
    return isa


@pytest.fixture(scope="session")
def model_path() -> Path:
    return resolve_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def chat_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    return [chat_ids(tokenizer, p) for p in CHAT_PROMPTS]


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def make_engine() -> Callable[..., LLMEngine]:
    """An fp32 engine on the default model, with cache, scheduler or device settings overridden."""

    def build(dtype: str = "float32", quantization: str = "none", **overrides: object) -> LLMEngine:
        def pick(cls: type) -> dict[str, object]:
            return {k: v for k, v in overrides.items() if k in cls.__dataclass_fields__}

        return LLMEngine(
            EngineConfig(
                model=ModelConfig(dtype=dtype, quantization=quantization),
                cache=CacheConfig(**({"kv_cache_memory_gib": SMALL_KV_GIB} | pick(CacheConfig))),
                scheduler=SchedulerConfig(**pick(SchedulerConfig)),
                parallel=ParallelConfig(**pick(ParallelConfig)),
            )
        )

    return build


@pytest.fixture(scope="session")
def engine_fp32(make_engine) -> LLMEngine:
    return make_engine()


def run_all(
    engine: LLMEngine,
    requests: dict[str, tuple[list[int], object]],
    arrivals: dict[int, list[str]] | None = None,
) -> dict[str, list]:
    """Run requests to completion; `arrivals` maps a step number to the ids that join then.
    Returns each request's outputs; asserts every KV block is back in the pool afterwards."""
    arrivals = arrivals or {0: list(requests)}
    results: dict[str, list] = {rid: [] for rid in requests}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for rid in arrivals.get(step, []):
            engine.add_request(rid, *requests[rid])
        for out in engine.step():
            results[out.request_id].append(out)
        step += 1
    assert_pool_full(engine)
    return results


def assert_pool_full(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def tokens_of(outputs: list, index: int = 0) -> list[int]:
    return [t for o in outputs for c in o.outputs if c.index == index for t in c.token_ids]


def text_of(outputs: list, index: int = 0) -> str:
    return "".join(c.text for o in outputs for c in o.outputs if c.index == index)
