"""The Llama family (Llama 2/3/3.x, SmolLM2, Qwen2 with QKV bias, Mistral) from TP layers."""

from __future__ import annotations

import torch
from torch import nn

from model_parallel.config import LlamaArchConfig
from model_parallel.distributed import TPGroup
from model_parallel.forward_context import ForwardContext
from model_parallel.layers.attention import PagedAttention
from model_parallel.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from model_parallel.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from model_parallel.layers.norm import RMSNorm, silu_and_mul
from model_parallel.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: LlamaArchConfig, rotary: RotaryEmbedding, tp: TPGroup, ctx: ForwardContext
    ):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias, tp
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, False, tp)
        self.rotary = rotary  # one table shared by every layer
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, cfg.head_dim, ctx)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, p = x.shape[0], self.qkv_proj
        q, k, v = p(x).split([p.q_size, p.kv_size, p.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v.view(t, self.num_kv_heads, self.head_dim)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaArchConfig, tp: TPGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, False, tp
        )
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: LlamaArchConfig, rotary: RotaryEmbedding, tp: TPGroup, ctx: ForwardContext
    ):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, tp, ctx)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: LlamaArchConfig, max_positions: int, tp: TPGroup, ctx: ForwardContext):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, tp, ctx) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
