"""Engine configuration: dataclasses built once (CLI or Serve YAML) and handed to the parts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# none: weights multiply as their dtype; w4a8: a GGUF's 4-bit weights times 8-bit activations
QUANTIZATIONS = ("none", "w4a8")


def resolve_dtype(model: ModelConfig, device: torch.device, bf16_kernels: bool) -> torch.dtype:
    """`auto` is the fastest dtype that keeps batch invariance, measured (README, Models): bf16 on
    GPUs and on CPUs whose kernels multiply bf16 natively (AMX tiles, or AVX512-BF16's
    vdpbf16ps: on a 2-core Zen 4, 853 tok/s at 32 streams against fp32's 396 over a GGUF's
    4-bit blocks, 81 against 91 at one stream); fp32 on AVX2-only CPUs, where bf16 is 5x
    slower. w4a8's integer linears take either; around them bf16 halves attention's bytes (Zen 4,
    32 streams: 908 tok/s against 684 in fp32, one stream alike)."""
    if model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or bf16_kernels else torch.float32
    if model.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {model.dtype!r}")
    return _DTYPES[model.dtype]


@dataclass(frozen=True, slots=True)
class LlamaArchConfig:
    """The architecture fields of a Llama-family config.json (Llama, SmolLM2, Qwen2, Mistral)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LlamaArchConfig:
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling if rope_type != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_checkpoint(cls, path: Path) -> LlamaArchConfig:
        cfg = json.loads((path / "config.json").read_text())
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        supported = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
        if arch not in supported:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(supported)}"
            )
        return cls.from_dict(cfg)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    cache_dir: str | None = None  # where converted GGUF checkpoints live; None: ~/.cache/llmcluster
    seed: int = 0
    quantization: str = "none"  # one of QUANTIZATIONS

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}"
            )
        if self.quantization == "w4a8" and self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"quantization w4a8 runs in float32 or bfloat16, not {self.dtype}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_gib: float | None = None  # None: 2 GiB on CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the device the model + KV may use
    num_blocks: int | None = None  # overrides the budget (tests force preemption with it)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_n: int = 16  # the largest n one request may ask for


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    device: str = "auto"  # auto: cuda when available, else cpu
    collective_timeout_s: float = 60.0  # a rank silent this long fails the engine, not hangs it

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def kv_bytes_per_token(arch: LlamaArchConfig, kv_heads_per_rank: int, dtype: torch.dtype) -> int:
    return 2 * arch.num_layers * kv_heads_per_rank * arch.head_dim * dtype.itemsize


def blocks_for_budget(budget_bytes: float, block_size: int, bytes_per_token: int) -> int:
    return max(1, math.floor(budget_bytes / (block_size * bytes_per_token)))
