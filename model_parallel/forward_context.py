"""Per-step attention metadata, bound for the length of one forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class PrefillChunk(NamedTuple):
    """One sequence's chunk of new tokens, placed after the decode tokens in the flat batch."""

    start: int  # offset of its first new token in the flat batch
    num_tokens: int
    context_len: int  # tokens it attends to, its new ones included
    block_table: torch.Tensor  # [num_blocks] block ids, only read when it has earlier context
    mask: (
        torch.Tensor | None
    )  # [num_tokens, context_len] causal mask with offset, or None for a fresh prompt


class KernelRows(NamedTuple):
    start: int
    rows: int
    block_tables: torch.Tensor  # [rows, W] int64
    context_lens: torch.Tensor  # [rows] int64


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat KV slot each new token is written to
    num_decode_tokens: int = 0  # the batch opens with this many single-token decodes
    decode_block_tables: torch.Tensor | None = None  # [B_d, max_blocks], padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [B_d] tokens each decode attends to
    # [B_d, 1, 1, max_blocks * block_size]: 0 or -inf; None where the CPU kernel attends instead
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Where the CPU kernel attends: (first row, rows, block tables [rows, W], context lens [rows])
    # per group: the decodes, then each prefill chunk's tokens as rows ending at themselves.
    kernel_rows: list[KernelRows] = field(default_factory=list)


def kernel_rows(md: AttentionMetadata, device: torch.device) -> list[KernelRows]:
    """md's rows grouped for the CPU attention kernel, once a step (every layer reads them)."""
    groups = []
    if md.num_decode_tokens:
        groups.append(
            KernelRows(0, md.num_decode_tokens, md.decode_block_tables, md.decode_context_lens)
        )
    for chunk in md.prefills:
        first = chunk.context_len - chunk.num_tokens + 1
        lens = torch.arange(first, chunk.context_len + 1, device=device)
        tables = chunk.block_table.expand(chunk.num_tokens, -1).contiguous()
        groups.append(KernelRows(chunk.start, chunk.num_tokens, tables, lens))
    return groups


def decode_mask(positions: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, width]: 0 where a decode at `positions` [B] sees a slot of its padded block
    table, -inf after it. Additive: SDPA's CPU kernel would convert a boolean mask every layer."""
    span = torch.arange(width, device=positions.device)
    bias = torch.zeros(positions.shape[0], width, dtype=dtype, device=positions.device)
    return bias.masked_fill_(span[None, :] > positions[:, None], float("-inf"))[:, None, None, :]


class ForwardContext:
    """Holds the metadata of the pass in flight; the model's attention layers read it."""

    def __init__(self) -> None:
        self._metadata: AttentionMetadata | None = None

    @property
    def metadata(self) -> AttentionMetadata:
        if self._metadata is None:
            raise RuntimeError("attention called outside a forward context")
        return self._metadata

    @contextmanager
    def bind(self, metadata: AttentionMetadata) -> Iterator[None]:
        if self._metadata is not None:
            raise RuntimeError("forward contexts do not nest")
        self._metadata = metadata
        try:
            yield
        finally:
            self._metadata = None
