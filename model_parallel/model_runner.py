"""One rank's model and KV-cache shards: scheduled batch -> flat tensors -> forward -> logits.

The flat batch puts single-token decodes first (attended in one batched call) and prefill chunks
after them; only rows that reach their last known token are turned into logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model_parallel.config import (
    EngineConfig,
    LlamaArchConfig,
    blocks_for_budget,
    kv_bytes_per_token,
)
from model_parallel.distributed import TPGroup
from model_parallel.forward_context import AttentionMetadata, ForwardContext, PrefillChunk
from model_parallel.loader import load_weights
from model_parallel.models.llama import LlamaForCausalLM
from model_parallel.scheduler import ScheduledSequence

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [B] flat indices whose hidden states become logits


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        arch: LlamaArchConfig,
        path: str,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: TPGroup,
    ):
        self.arch, self.dtype, self.device, self.tp = arch, dtype, device, tp
        self.block_size = config.cache.block_size
        self.ctx = ForwardContext()
        with torch.device(device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                self.model = LlamaForCausalLM(arch, max_model_len, tp, self.ctx)
            finally:
                torch.set_default_dtype(prev)
        load_weights(self.model, Path(path))
        self.model.eval()
        for module in self.model.modules():
            if hasattr(module, "pack"):
                module.pack()
        self.num_blocks = self._num_blocks(config)
        attn0 = self.model.layers[0].self_attn
        # NOTE: one KV tensor per rank: [2, layers, blocks, block_size, kv_heads_per_rank, head_dim]
        self.kv_cache = torch.zeros(
            2,
            arch.num_layers,
            self.num_blocks,
            self.block_size,
            attn0.num_kv_heads,
            arch.head_dim,
            dtype=dtype,
            device=device,
        )
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.attn.v_cache = self.kv_cache[1, i]
        logger.info(
            "rank %d: KV cache of %d blocks x %d tokens = %d tokens",
            tp.rank,
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
        )

    def _num_blocks(self, config: EngineConfig) -> int:
        cache = config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        kv_heads = self.model.layers[0].self_attn.num_kv_heads
        per_token = kv_bytes_per_token(self.arch, kv_heads, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * cache.gpu_memory_utilization - (total - free)
        else:
            budget = (cache.kv_cache_memory_gib or 2.0) * 2**30
        if budget <= 0:
            raise RuntimeError(
                "no memory left for the KV cache; lower the model size or raise the budget"
            )
        return blocks_for_budget(budget, self.block_size, per_token)

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        """Rank 0: the scheduler's batch as tensors. Decodes first, then prefill chunks."""
        bs = self.block_size
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        ids: list[int] = [s.seq.token_ids[s.seq.num_computed_tokens] for s in decodes]
        pos: list[int] = [s.seq.num_computed_tokens for s in decodes]
        slots: list[int] = [s.seq.block_table[p // bs] * bs + p % bs for s, p in zip(decodes, pos)]
        sample_rows = list(range(len(decodes)))
        md = AttentionMetadata(slot_mapping=torch.empty(0), num_decode_tokens=len(decodes))
        if decodes:
            md.decode_block_tables, md.decode_mask = self._decode_tables(decodes, pos)
        for s in prefills:
            seq, n, start = s.seq, s.num_new_tokens, len(ids)
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c : c + n])
            pos.extend(range(c, c + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(c, c + n))
            mask = None
            if c:
                q_pos = torch.arange(c, c + n, device=self.device)
                mask = torch.arange(c + n, device=self.device)[None, :] <= q_pos[:, None]
            table = torch.tensor(seq.block_table[: -(-(c + n) // bs)], device=self.device)
            md.prefills.append(PrefillChunk(start, n, c + n, table, mask))
            if s.samples:
                sample_rows.append(start + n - 1)
        md.slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        return StepInputs(
            torch.tensor(ids, device=self.device),
            torch.tensor(pos, device=self.device),
            md,
            torch.tensor(sample_rows, dtype=torch.long, device=self.device),
        )

    def _decode_tables(
        self, decodes: list[ScheduledSequence], pos: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(p // self.block_size for p in pos) + 1
        tables = [
            s.seq.block_table[:width] + [0] * (width - min(width, len(s.seq.block_table)))
            for s in decodes
        ]
        block_tables = torch.tensor(tables, dtype=torch.long, device=self.device)
        span = torch.arange(width * self.block_size, device=self.device)
        mask = span[None, :] <= torch.tensor(pos, device=self.device)[:, None]  # [B, L]
        return block_tables, mask[:, None, None, :]

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Every rank: the step's forward pass -> logits [B, V] for the sampled rows."""
        with self.ctx.bind(inputs.metadata):
            hidden = self.model(inputs.input_ids, inputs.positions)
        return self.model.compute_logits(hidden[inputs.sample_rows])
