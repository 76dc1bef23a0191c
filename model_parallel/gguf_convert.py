"""GGUF file -> HF checkpoint directory (config.json, fp32 safetensors, tokenizer), converted once
and cached on disk, so every later start (and every TP rank) loads plain safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ARCHES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    return f"{_TOP_NAMES[base]}.{kind}"


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves the rotary halves of q/k rows; HF keeps them as two halves."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config(reader: Any, vocab_size: int, has_output: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHES)}")
    if _field(reader, f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
        raise ValueError(
            "GGUF rope scaling other than linear is not supported; use the HF checkpoint"
        )
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    cfg = {
        "architectures": [_ARCHES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.rope.dimension_count", hidden // heads),
        "max_position_embeddings": _field(reader, f"{arch}.context_length"),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if factor := _field(reader, f"{arch}.rope.scaling.factor"):
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return cfg


def _tensors(reader: Any, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ValueError("GGUF files with rope_freqs (llama3 scaling) are not supported")
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if cfg["model_type"] == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads" if "attn_q" in t.name else "num_key_value_heads"]
            w = unpermute_rope(w, heads)
        out[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def content_key(gguf_path: Path, index_dir: Path) -> str:
    """The sha256 of the file's bytes, so the same GGUF at another path (a new venv, another clone)
    finds its one conversion instead of writing another. Hashed once per path, size and mtime;
    later starts read it back from a small index file."""
    st = gguf_path.stat()
    where = f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    entry = index_dir / hashlib.sha256(where.encode()).hexdigest()[:32]
    if entry.exists():
        return entry.read_text()
    with open(gguf_path, "rb") as f:
        key = hashlib.file_digest(f, "sha256").hexdigest()
    index_dir.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
    tmp.write_text(key)
    os.replace(tmp, entry)  # atomic: ranks starting together write the same key
    return key


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """The HF directory for `gguf_path`, converted on first use (atomically, so concurrent starts
    of several ranks or replicas never see a half-written directory)."""
    key = content_key(gguf_path, cache_root / "gguf" / ".index")
    target = cache_root / "gguf" / f"{gguf_path.stem}-{key[:16]}"
    if (target / "config.json").exists():
        return target
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    reader = GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = _config(reader, len(tokens.data), has_output)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_file(_tensors(reader, cfg), str(tmp / "model.safetensors"))
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # lost a race only if the winner finished
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
