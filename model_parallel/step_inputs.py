"""One step's batch as flat integer tensors: what rank 0 builds from the schedule and broadcasts to
the other ranks (two broadcasts a step: a fixed-size header, then one payload)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_parallel.scheduler import ScheduledSequence

HEADER_SIZE = 8
CMD_STEP, CMD_STOP = 1, 2


def split_batch(
    scheduled: list[ScheduledSequence],
) -> tuple[list[ScheduledSequence], list[ScheduledSequence]]:
    """Single-token steps first, then chunks. NOTE: logits rows come back in this order."""
    return (
        [s for s in scheduled if s.num_new_tokens == 1],
        [s for s in scheduled if s.num_new_tokens > 1],
    )


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]; the first num_decodes tokens are single-token decodes
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV slot each new token is written to
    num_decodes: int
    decode_tables: torch.Tensor  # [num_decodes, W] block tables, padded with block 0
    prefills: torch.Tensor  # [P, 4]: start in the flat batch, new tokens, context length, blocks
    prefill_tables: torch.Tensor  # the P chunks' block tables, concatenated
    sample_rows: torch.Tensor  # [B] flat rows whose hidden states become logits

    @classmethod
    def build(
        cls, scheduled: list[ScheduledSequence], block_size: int, device: torch.device
    ) -> StepInputs:
        bs = block_size
        decodes, chunks = split_batch(scheduled)
        ids = [s.seq.token_ids[s.seq.num_computed_tokens] for s in decodes]
        pos = [s.seq.num_computed_tokens for s in decodes]
        slots = [s.seq.block_table[p // bs] * bs + p % bs for s, p in zip(decodes, pos)]
        width = max((p // bs + 1 for p in pos), default=0)
        tables = [
            s.seq.block_table[:width] + [0] * (width - len(s.seq.block_table[:width]))
            for s in decodes
        ]
        rows = [i for i, s in enumerate(decodes) if s.samples]  # a 1-token chunk may not sample
        descs: list[list[int]] = []
        chunk_tables: list[int] = []
        for s in chunks:
            seq, n, start = s.seq, s.num_new_tokens, len(ids)
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c : c + n])
            pos.extend(range(c, c + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(c, c + n))
            num_blocks = -(-(c + n) // bs)
            descs.append([start, n, c + n, num_blocks])
            chunk_tables.extend(seq.block_table[:num_blocks])
            if s.samples:
                rows.append(start + n - 1)

        def t(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            t(ids),
            t(pos),
            t(slots),
            len(decodes),
            t(tables).view(len(decodes), width),
            t(descs).view(len(descs), 4),
            t(chunk_tables),
            t(rows),
        )

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        header = torch.tensor(
            [
                CMD_STEP,
                self.input_ids.numel(),
                self.num_decodes,
                self.decode_tables.shape[1],
                self.prefills.shape[0],
                self.prefill_tables.numel(),
                self.sample_rows.numel(),
                0,
            ],
            dtype=torch.long,
            device=self.input_ids.device,
        )
        payload = torch.cat(
            [
                self.input_ids,
                self.positions,
                self.slot_mapping,
                self.decode_tables.flatten(),
                self.prefills.flatten(),
                self.prefill_tables,
                self.sample_rows,
            ]
        )
        return header, payload

    @staticmethod
    def payload_size(header: list[int]) -> int:
        _, t, nd, w, p, nt, nr, _ = header
        return 3 * t + nd * w + 4 * p + nt + nr

    @classmethod
    def unpack(cls, header: list[int], payload: torch.Tensor) -> StepInputs:
        _, t, nd, w, p, nt, nr, _ = header
        parts = payload.split([t, t, t, nd * w, 4 * p, nt, nr])
        return cls(
            parts[0],
            parts[1],
            parts[2],
            nd,
            parts[3].view(nd, w),
            parts[4].view(p, 4),
            parts[5],
            parts[6],
        )
