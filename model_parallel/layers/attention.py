"""Attention over the paged KV cache. New keys and values are written to their slots first; decodes
then read their context through the block tables in one batched call, prefill chunks one by one.
On CPU the kernel takes prefill chunks too, one query row at a time over the cache: a token's
attention is then the same bits whether it came in a fresh prompt, a later chunk, after a prefix
cache hit or as a decode (SDPA's kernels differ between those, visibly in bf16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel.forward_context import AttentionMetadata, ForwardContext, PrefillChunk
from model_parallel.layers import cpu_kernels


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ctx: ForwardContext):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.ctx = ctx
        # [num_blocks, block_size, kv_heads, head_dim] views into the rank's one KV tensor
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, head_dim], k/v: [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        md = self.ctx.metadata
        kv_heads, d = self.num_kv_heads, self.head_dim
        out = torch.empty(q.shape[0], self.num_heads * d, dtype=q.dtype, device=q.device)
        nd = md.num_decode_tokens
        if cpu_kernels.enabled(q.device, q.dtype):
            cpu_kernels.write_kv(self.k_cache, self.v_cache, k, v, md.slot_mapping)
            self._by_rows(out, q, md)
            return out
        self.k_cache.view(-1, kv_heads, d).index_copy_(0, md.slot_mapping, k)
        self.v_cache.view(-1, kv_heads, d).index_copy_(0, md.slot_mapping, v)
        if nd:
            out[:nd] = self._decode(q[:nd], md.decode_block_tables, md.decode_mask)
        for chunk in md.prefills:
            s = slice(chunk.start, chunk.start + chunk.num_tokens)
            out[s] = self._prefill(q[s], k[s], v[s], chunk)
        return out

    def _by_rows(self, out: torch.Tensor, q: torch.Tensor, md: AttentionMetadata) -> None:
        """The CPU kernel over every query row, reading the blocks in place: decodes in one call,
        each prefill chunk's tokens as rows of their own with contexts ending at themselves."""
        for start, rows, tables, lens in md.kernel_rows:
            s = slice(start, start + rows)
            cpu_kernels.decode_attention(out[s], q[s], self.k_cache, self.v_cache, tables, lens)

    def _decode(
        self, q: torch.Tensor, block_tables: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, kv_heads, d = q.shape[0], self.num_kv_heads, self.head_dim
        # One query token per sequence: its heads of one KV group become that group's query rows,
        # so grouped-query attention needs no copies of K and V.
        qg = q.view(b, kv_heads, -1, d)  # [B, kv_heads, group, d]
        flat = block_tables.view(-1)  # index_select is ~8x faster than advanced indexing on CPU
        kc = self.k_cache.index_select(0, flat).view(b, -1, kv_heads, d).transpose(1, 2)
        vc = self.v_cache.index_select(0, flat).view(b, -1, kv_heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask)
        return o.reshape(b, -1)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk
    ) -> torch.Tensor:
        n, d = chunk.num_tokens, self.head_dim
        if chunk.mask is None:  # a fresh prompt: its own keys are the whole context
            kc, vc = k.transpose(0, 1), v.transpose(0, 1)
        else:
            kc = self.k_cache.index_select(0, chunk.block_table).view(-1, self.num_kv_heads, d)
            vc = self.v_cache.index_select(0, chunk.block_table).view(-1, self.num_kv_heads, d)
            kc, vc = kc[: chunk.context_len], vc[: chunk.context_len]
            kc, vc = kc.transpose(0, 1), vc.transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            kc,
            vc,
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            enable_gqa=True,
        )
        return o.transpose(0, 1).reshape(n, -1)
