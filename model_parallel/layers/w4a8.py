"""`--quantization w4a8`: a GGUF's 4-bit weights multiplied by activations rounded to 8 bits per
32 inputs, as llama.cpp does, so that the products are integer dot products (AVX512-VNNI's
vpdpbusd: four times the multiply-adds of an fp32 FMA). Opt-in, since the activations' rounding
moves the logits a little from the fp32 path (tests/model_parallel/test_w4a8.py measures how
much); a row's result still does not depend on its batch, nor on the instruction set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_parallel.layers.block_quant import BLOCK, COLUMNS, as_bytes, as_q4, to_tiles


@dataclass(frozen=True)
class W4A8:
    """Per tile of 16 features x 32 inputs: 16 fp32 scales, 16 fp32 minimums, then 4 groups of 64
    bytes, byte 4j + b of group g holding feature j's 4-bit value of input 4g + b (low nibble)
    and of input 16 + 4g + b (high): the operand shape of vpdpbusd. Tiles run along the inputs,
    then the features."""

    blocks: torch.Tensor  # uint8 [out / 16, in / 32, 384]
    out_features: int
    in_features: int


def to_w4a8(weight: torch.Tensor) -> W4A8 | None:
    """The form of an fp32 [out, in] weight that is exactly Q4_1, or None."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.float32 or out_features % COLUMNS or in_features % BLOCK:
        return None
    v = weight.detach().reshape(out_features, in_features // BLOCK, BLOCK)
    if not torch.isfinite(v).all() or (q4 := as_q4(v)) is None:
        return None
    d, q, m = q4
    groups = out_features // COLUMNS
    # [G, j, kb, h, g, b]: input 16 h + 4 g + b of feature j in block kb
    q = q.to(torch.uint8).view(groups, COLUMNS, in_features // BLOCK, 2, 4, 4)
    nibbles = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [G, kb, g, j, b]
    parts = [to_tiles(d, groups), to_tiles(m, groups), nibbles]
    return W4A8(torch.cat([as_bytes(p) for p in parts], dim=-1), out_features, in_features)
