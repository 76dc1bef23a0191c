"""`--quantization w4a8`: a GGUF's 4-bit weights (and its 8-bit LM head) multiplied by
activations rounded to 8 bits per 32 inputs, as llama.cpp does, so that the products are integer
dot products (AVX512-VNNI's vpdpbusd: four times the multiply-adds of an fp32 FMA). Opt-in, since
the activations' rounding moves the logits a little from the fp32 path (tests/model_parallel/
test_w4a8.py measures how much); a row's result still does not depend on its batch, nor on the
instruction set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_parallel.layers.block_quant import BLOCK, COLUMNS, as_bytes, find_blocks, to_tiles


@dataclass(frozen=True)
class W4A8:
    """Per tile of 16 features x 32 inputs: 16 fp32 scales; for 4 bits 16 fp32 minimums and 4
    groups of 64 bytes, byte 4j + b of group g holding feature j's value of input 4g + b (low
    nibble) and of input 16 + 4g + b (high); for 8 bits (a Q8_0 LM head) 8 groups of 64 bytes,
    byte 4j + b of group g holding q + 128 of input 4g + b. Either is the operand shape of
    vpdpbusd (unsigned weights, signed activations). Tiles run along the inputs, then features."""

    blocks: torch.Tensor  # uint8 [out / 16, in / 32, 384 or 576]
    bits: int
    out_features: int
    in_features: int


def to_w4a8(weight: torch.Tensor) -> W4A8 | None:
    """The form of an fp32 [out, in] weight that is exactly Q4_1 or Q8_0, or None."""
    if (found := find_blocks(weight)) is None:
        return None
    (bits, values), (out_features, in_features) = found, weight.shape
    groups, blocks = out_features // COLUMNS, in_features // BLOCK
    if bits == 4:
        d, q, m = values
        # [G, j, kb, h, g, b]: input 16 h + 4 g + b of feature j in block kb
        q = q.to(torch.uint8).view(groups, COLUMNS, blocks, 2, 4, 4)
        weights = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [G, kb, g, j, b]
        parts = [to_tiles(d, groups), to_tiles(m, groups), weights]
    else:
        d, q = values
        q = (q.to(torch.int8).view(torch.uint8) ^ 0x80).view(groups, COLUMNS, blocks, 8, 4)
        parts = [to_tiles(d, groups), q.permute(0, 2, 3, 1, 4)]  # [G, kb, g, j, b]
    return W4A8(torch.cat([as_bytes(p) for p in parts], dim=-1), bits, out_features, in_features)
