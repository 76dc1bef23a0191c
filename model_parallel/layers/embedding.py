"""Vocabulary-parallel embedding and LM head: each rank owns a contiguous slice of the vocabulary
(padded so that every rank's slice has the same size)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel.distributed import TPGroup
from model_parallel.layers.block_quant import BlockQuantized
from model_parallel.layers.linear import Packed, linear, pack_weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        rows = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Each rank scores its vocabulary slice; the slices are gathered for the sampler."""

    packed: Packed | None = None

    def pack(
        self, quantization: str = "none", blocks: BlockQuantized | None = None
    ) -> Packed | None:
        """The embedding keeps the plain weight (it is tied); w4a8 takes 4-bit weights only."""
        self.packed = pack_weight(self.weight, quantization, blocks)
        return self.packed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, self.packed)  # [T, V / tp]
        logits = self.tp.all_gather(logits, dim=-1)  # [T, V padded]
        return logits[:, : self.vocab_size]
