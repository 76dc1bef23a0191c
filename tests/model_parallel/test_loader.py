"""Finding a model on disk and turning GGUF into a checkpoint our layers load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model_parallel.config import LlamaArchConfig
from model_parallel.gguf_convert import convert_gguf, hf_name, unpermute_rope
from model_parallel.loader import builtin_gguf, holds_fp32, resolve_model_path


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (convert_hf_to_gguf.py)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp() -> None:
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    assert np.array_equal(unpermute_rope(llama_cpp_permute(w, 3), 3), w)


def test_gguf_names_map_to_hf() -> None:
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"


def test_default_model_converts_to_a_smollm2_checkpoint(model_path) -> None:
    cfg = json.loads((model_path / "config.json").read_text())
    arch = LlamaArchConfig.from_dict(cfg)
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.hidden_size) == (30, 9, 3, 576)
    assert arch.tie_word_embeddings and arch.eos_token_ids == (2,)
    assert (model_path / "model.safetensors").exists() and (model_path / "tokenizer.json").exists()
    assert resolve_model_path(str(model_path)) == model_path


def test_a_copy_of_the_gguf_finds_the_same_conversion(model_path, tmp_path) -> None:
    """Another venv or clone holds the same file at another path: no second 540 MB conversion."""
    cache = tmp_path / "cache"
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / model_path.name).symlink_to(model_path)  # the conversion, already there
    gguf = builtin_gguf()
    copy = tmp_path / "venv2" / gguf.name
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    assert convert_gguf(copy, cache).name == model_path.name  # found by content, not converted
    assert len(list((cache / "gguf" / ".index").iterdir())) == 1  # the copy's path is indexed
    assert convert_gguf(copy, cache).name == model_path.name


def test_missing_model_is_a_clear_error_and_never_a_download(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model_path("meta-llama/Llama-3.2-1B-Instruct", str(tmp_path))


def test_only_an_fp32_checkpoint_is_searched_for_gguf_blocks(model_path, tmp_path) -> None:
    """A bf16 run builds its model in fp32 first only where the blocks can be: a bf16 checkpoint
    would otherwise take twice its size in memory to load."""
    assert holds_fp32(model_path)  # the GGUF's conversion
    weights = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert not holds_fp32(tmp_path)
    assert not holds_fp32(tmp_path / "empty")
