"""Dense CPU weights laid out for the C kernels of cpu_linear.c: tiles of 16 output features, each
a panel of its inputs in order, so that the kernel streams one tile's weights contiguously and
every output is one multiply-add chain over the inputs (batch invariance). fp32 tiles are [k][16];
bf16 tiles are [k/2][64] pairs (inputs 2p and 2p+1 of a feature in one dword), the operand shape
of AVX512-BF16's vdpbf16ps, four registers wide. A bf16 panel of a GGUF's weights may carry their
4- or 8-bit blocks too, which the kernels read instead at a few rows, to the same bits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_parallel.layers.block_quant import BlockQuantized

COLUMNS = {torch.float32: 16, torch.bfloat16: 64}  # output features a tile
ALIGN = 32  # inputs: the kernels' unrolled k loop


@dataclass(frozen=True)
class Panel:
    data: torch.Tensor  # fp32 [out / 16, in, 16] or bf16 [out / 64, in / 2, 64, 2]
    out_features: int
    in_features: int
    blocks: BlockQuantized | None = None  # bf16 only: the fp32 weight's exact blocks


def to_panel(weight: torch.Tensor, blocks: BlockQuantized | None = None) -> Panel | None:
    """The tiled form of an fp32 or bf16 [out, in] weight, or None for shapes the kernels do not
    tile (every Llama-family projection does: hidden sizes are multiples of 64). blocks: those of
    the fp32 weight this bf16 one was rounded from."""
    out_features, in_features = weight.shape
    columns = COLUMNS.get(weight.dtype)
    if columns is None or out_features % columns or in_features % ALIGN:
        return None
    w = weight.detach()
    if w.dtype == torch.float32:
        data = w.view(-1, columns, in_features).transpose(1, 2)
    else:
        data = w.view(-1, columns, in_features // 2, 2).permute(0, 2, 1, 3)
    assert blocks is None or (w.dtype == torch.bfloat16 and blocks.out_features == out_features)
    return Panel(data.contiguous(), out_features, in_features, blocks)
