"""Weights that are exactly a block quantization (a GGUF's Q4_1 or Q8_0, dequantized to fp32 by
the loader) kept in that form: 6 or 9 bits a weight instead of 32. Decode at a few dozen rows
streams every weight once a step, so this cuts its memory traffic five-fold; the C kernel expands
each block back to the very same fp32 values before multiplying, so results stay fp32 results.

Nothing is approximated: a weight is taken only when every value is reproduced bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # inputs per scale (GGUF's block)
COLUMNS = 16  # output features laid side by side, one kernel tile wide


@dataclass(frozen=True)
class BlockQuantized:
    """Per tile of 16 output features x 32 inputs: 16 fp32 scales, then for 4 bits 16 fp32
    minimums and 32 rows of 8 bytes (feature j in the low nibble of byte j, j + 8 in the high),
    for 8 bits 32 rows of 16 signed bytes. Tiles run along the inputs, then the features."""

    blocks: torch.Tensor  # uint8 [out / 16, in / 32, tile bytes]
    bits: int
    out_features: int
    in_features: int


def as_q8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """v = d * q, q in [-127, 127]: Q8_0."""
    d = v.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, v / d, 0).round().clamp(-127, 127)
    return (d, q) if torch.equal(d * q, v) else None


def as_q4(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """v = d * q + m, q in [0, 15], d an fp16 value: Q4_1 (whose m is the block's minimum)."""
    m = v.amin(-1, keepdim=True)
    d = ((v.amax(-1, keepdim=True) - m) / 15).half().float()
    q = torch.where(d > 0, (v - m) / d, 0).round().clamp(0, 15)
    return (d, q, m) if torch.equal(d * q + m, v) else None


def to_tiles(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[out, in / 32, w] -> [out / 16, in / 32, 16, w]"""
    return x.view(groups, COLUMNS, *x.shape[1:]).transpose(1, 2)


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """[G, nb, ...] -> [G, nb, bytes]"""
    return x.contiguous().view(torch.uint8).flatten(2)


def find_blocks(weight: torch.Tensor) -> tuple[int, tuple[torch.Tensor, ...]] | None:
    """(4, (d, q, m)) or (8, (d, q)), each [out, in / 32, 1 or 32], where an fp32 [out, in]
    weight is exactly Q4_1 or Q8_0 in tiles the kernels take; else None."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.float32 or out_features % COLUMNS or in_features % BLOCK:
        return None
    v = weight.detach().reshape(out_features, in_features // BLOCK, BLOCK)
    if not torch.isfinite(v).all():
        return None
    # the first tile's rows decide cheaply which form to check in full (an 8-bit LM head is big)
    if as_q4(v[:COLUMNS]) is not None and (q4 := as_q4(v)) is not None:
        return 4, q4
    if (q8 := as_q8(v)) is not None:
        return 8, q8
    return None


def block_quantize(weight: torch.Tensor) -> BlockQuantized | None:
    """The exact 4- or 8-bit form of an fp32 [out, in] weight, or None where there is none."""
    if (found := find_blocks(weight)) is None:
        return None
    (bits, values), groups = found, weight.shape[0] // COLUMNS
    if bits == 4:
        d, q, m = values
        q = to_tiles(q.to(torch.uint8), groups).transpose(2, 3)  # [G, nb, 32 inputs, 16 features]
        nibbles = q[..., : COLUMNS // 2] | (q[..., COLUMNS // 2 :] << 4)
        parts = [to_tiles(d, groups), to_tiles(m, groups), nibbles]
    else:
        d, q = values
        parts = [to_tiles(d, groups), to_tiles(q.to(torch.int8), groups).transpose(2, 3)]
    blocks = torch.cat([as_bytes(p) for p in parts], dim=-1)
    return BlockQuantized(blocks, bits, *weight.shape)
