"""Block-quantized linears: a GGUF Q4_1 or Q8_0 weight, dequantized to fp32, is found again block
by block and expands back to the same fp32 values bit for bit; anything else stays dense. The C
kernel's product equals an fp32 matmul to rounding, and a row's result does not depend on the
rows around it. The default model runs on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from model_parallel.layers import cpu_kernels
from model_parallel.layers.block_quant import BlockQuantized, block_quantize
from model_parallel.layers.linear import LinearBase

pytestmark = pytest.mark.usefixtures("kernel_isa")  # on every instruction set the CPU has


def gguf_weight(kind: GGMLQuantizationType, out: int = 64, inputs: int = 96) -> torch.Tensor:
    """A weight as the loader sees a GGUF tensor of that kind: quantized, then dequantized."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out, inputs)).astype(np.float32) * 0.05
    return torch.from_numpy(dequantize(quantize(w, kind), kind).astype(np.float32))


@pytest.mark.parametrize(("kind", "bits"), [("Q4_1", 4), ("Q8_0", 8)])
def test_gguf_blocks_are_found_and_expand_bit_for_bit(kind: str, bits: int) -> None:
    w = gguf_weight(GGMLQuantizationType[kind])
    q = block_quantize(w)
    assert q is not None and q.bits == bits
    # 4 bits: 16 scales and 16 minimums (fp32) and 256 bytes of nibbles per 16 x 32 tile
    assert q.blocks.numel() == w.numel() // 512 * (384 if bits == 4 else 576)
    eye = torch.eye(w.shape[1])  # x = I: every output is exactly one expanded weight
    assert torch.equal(cpu_kernels.linear(eye, q, None), w.T)


def test_other_weights_stay_dense() -> None:
    w = gguf_weight(GGMLQuantizationType.Q4_1)
    nudged = w.clone()
    nudged[5, 7] = torch.nextafter(nudged[5, 7], torch.tensor(1.0))
    assert block_quantize(nudged) is None  # one value off by one ulp
    assert block_quantize(torch.randn(64, 96)) is None
    assert block_quantize(w.bfloat16()) is None
    assert block_quantize(w[:, :80]) is None  # inputs not a multiple of the 32-wide block
    assert block_quantize(w[:56]) is None  # outputs not a multiple of the 16-wide tile
    infinite = w.clone()
    infinite[0, 0] = float("inf")
    assert block_quantize(infinite) is None


@pytest.mark.parametrize("bias", [False, True])
def test_product_is_an_fp32_matmul_and_each_row_is_independent(bias: bool) -> None:
    w = gguf_weight(GGMLQuantizationType.Q4_1, out=48, inputs=128)
    q = block_quantize(w)
    assert q is not None
    torch.manual_seed(0)
    b = torch.randn(48) if bias else None
    assert cpu_kernels.linear(torch.randn(0, 128), q, b).shape == (0, 48)
    for m in [1, 2, 3, 5, 7, 8, 9, 13, 32, 67]:  # every row count the kernel tiles differently
        x = torch.randn(m, 128)
        y = cpu_kernels.linear(x, q, b)
        ref = x.double() @ w.double().T + (b.double() if bias else 0)
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
        alone = torch.cat([cpu_kernels.linear(x[i : i + 1], q, b) for i in range(m)])
        assert torch.equal(y, alone)
    x3 = torch.randn(2, 3, 128)  # leading dimensions are kept
    y3 = cpu_kernels.linear(x3, q, b)
    assert y3.shape == (2, 3, 48)
    assert torch.equal(y3[1], cpu_kernels.linear(x3[1], q, b))


def test_default_model_runs_on_block_quantized_weights(engine_fp32) -> None:
    """SmolLM2's GGUF is Q4_1 with a Q8_0 embedding (the tied LM head)."""
    model = engine_fp32.runner.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(linears) == 4 * len(model.layers)
    assert all(isinstance(m.packed, BlockQuantized) and m.packed.bits == 4 for m in linears)
    assert isinstance(model.lm_head.packed, BlockQuantized) and model.lm_head.packed.bits == 8
