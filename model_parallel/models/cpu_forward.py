"""A Llama model's decoder stack as one C call (cpu_model.c) on a one-rank CPU engine whose
linears all run on our kernels. The module forward calls the same kernels in the same order, one
Python call each: ~300 a step, ~4.5 ms of a 21 ms one-stream step on the AMX Xeon and 13.0 of
28.4 on a slow Zen 3. The structures below are built once and point at the model's own
tensors, which the model keeps alive."""

from __future__ import annotations

import ctypes

import torch

from model_parallel.distributed import TPGroup
from model_parallel.forward_context import AttentionMetadata
from model_parallel.layers import cpu_kernels
from model_parallel.layers.linear import LinearBase
from model_parallel.layers.panel import Panel
from model_parallel.layers.w4a8 import W4A8
from model_parallel.models.llama import LlamaForCausalLM

_I, _P = ctypes.c_int, ctypes.c_void_p
BLOCK_QUANT, PANEL, W4A8_KIND = 0, 1, 2  # cpu_model.c's enum


class _Linear(ctypes.Structure):
    _fields_ = [(n, _I) for n in ("kind", "bits", "in_features", "out_features")] + [
        (n, _P) for n in ("weight", "bias", "blocks")
    ]


class _Layer(ctypes.Structure):
    _fields_ = [(n, _Linear) for n in ("qkv", "o", "gate_up", "down")] + [
        (n, _P) for n in ("input_norm", "post_norm", "k_cache", "v_cache")
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        (n, _I)
        for n in (
            "num_layers",
            "hidden",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate",
            "block_size",
        )
    ] + [
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", _P),
        ("cos", _P),
        ("sin", _P),
    ]


class _AttentionRows(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("start", "rows", "width")] + [
        ("tables", _P),
        ("lens", _P),
    ]


def _linear(layer: LinearBase) -> _Linear:
    p = layer.packed
    assert p is not None
    bias = None if layer.bias is None else layer.bias.data_ptr()
    if isinstance(p, Panel):
        blocks, bits = (
            (None, 0) if p.blocks is None else (p.blocks.blocks.data_ptr(), p.blocks.bits)
        )
        return _Linear(PANEL, bits, p.in_features, p.out_features, p.data.data_ptr(), bias, blocks)
    kind = W4A8_KIND if isinstance(p, W4A8) else BLOCK_QUANT
    return _Linear(kind, p.bits, p.in_features, p.out_features, p.blocks.data_ptr(), bias)


class CpuForward:
    def __init__(self, model: LlamaForCausalLM, block_size: int):
        cfg, attn0 = model.cfg, model.layers[0].self_attn
        self.model, self.dtype = model, model.norm.weight.dtype
        layers = (_Layer * len(model.layers))(
            *(
                _Layer(
                    _linear(layer.self_attn.qkv_proj),
                    _linear(layer.self_attn.o_proj),
                    _linear(layer.mlp.gate_up_proj),
                    _linear(layer.mlp.down_proj),
                    layer.input_layernorm.weight.data_ptr(),
                    layer.post_attention_layernorm.weight.data_ptr(),
                    layer.self_attn.attn.k_cache.data_ptr(),
                    layer.self_attn.attn.v_cache.data_ptr(),
                )
                for layer in model.layers
            )
        )
        self.sizes = (
            cfg.hidden_size,
            attn0.qkv_proj.q_size + 2 * attn0.qkv_proj.kv_size,
            attn0.qkv_proj.q_size,
            2 * cfg.intermediate_size,
            cfg.intermediate_size,
        )
        self.struct = _Model(
            len(model.layers),
            cfg.hidden_size,
            attn0.num_heads,
            attn0.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            block_size,
            model.norm.eps,
            cfg.head_dim**-0.5,
            layers,
            model.norm.weight.data_ptr(),
            attn0.rotary.cos.data_ptr(),
            attn0.rotary.sin.data_ptr(),
        )

    @classmethod
    def build(cls, model: LlamaForCausalLM, tp: TPGroup, block_size: int) -> CpuForward | None:
        """None where the module forward must run: several ranks (all-reduces between the
        layers), CUDA, or a linear that is not on our kernels. After the KV cache is bound."""
        weight = model.norm.weight
        linears = [m for m in model.layers.modules() if isinstance(m, LinearBase)]
        if (
            tp.size > 1
            or not cpu_kernels.linear_enabled(weight.device, weight.dtype)
            or any(m.packed is None for m in linears)
        ):
            return None
        return cls(model, block_size)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        """-> hidden states [T, hidden] after the final norm, as the module forward returns."""
        x = self.model.embed_tokens(input_ids)
        t = x.shape[0]
        rows = (_AttentionRows * len(md.kernel_rows))(
            *(
                _AttentionRows(start, n, tables.shape[1], tables.data_ptr(), lens.data_ptr())
                for start, n, tables, lens in md.kernel_rows
            )
        )
        residual, qkv, attn, gate_up, act = (
            torch.empty(t, n, dtype=self.dtype) for n in self.sizes
        )
        cpu_kernels.kernel("llama_forward", self.dtype)(
            ctypes.addressof(self.struct),
            x.data_ptr(),
            residual.data_ptr(),
            t,
            positions.data_ptr(),
            md.slot_mapping.data_ptr(),
            ctypes.addressof(rows),
            len(rows),
            qkv.data_ptr(),
            attn.data_ptr(),
            gate_up.data_ptr(),
            act.data_ptr(),
            torch.get_num_threads(),
        )
        return x
