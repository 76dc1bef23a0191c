"""Block-quantized linears: a GGUF Q4_1 or Q8_0 weight, dequantized to fp32, is found again block
by block and expands back to the same fp32 values bit for bit; anything else stays dense. The C
kernel's product equals an fp32 matmul to rounding, and a row's result does not depend on the
rows around it. The default model runs on it, and its bf16 panels read it at a few rows, to the
panels' own bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from model_parallel.layers import cpu_kernels
from model_parallel.layers.block_quant import BlockQuantized, block_quantize
from model_parallel.layers.linear import LinearBase
from model_parallel.layers.panel import Panel, to_panel

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


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_bf16_panel_reads_its_blocks_to_the_panels_bits(kind: str) -> None:
    """The blocks are read at up to six rows (16 on AMX), the panel beyond: a row's bits must be
    the same either way, or a stream's tokens would depend on how many share its step."""
    w = gguf_weight(GGMLQuantizationType[kind], out=128, inputs=96)
    plain, twin = to_panel(w.bfloat16()), to_panel(w.bfloat16(), block_quantize(w))
    assert plain is not None and twin is not None and twin.blocks is not None
    torch.manual_seed(0)
    bias = torch.randn(128).bfloat16()
    for m in [0, 1, 2, 3, 5, 6, 7, 13, 16, 17, 32]:
        x = torch.randn(m, 96).bfloat16()
        for b in (None, bias):
            assert torch.equal(cpu_kernels.linear(x, twin, b), cpu_kernels.linear(x, plain, b))


def test_bf16_model_keeps_the_gguf_blocks_beside_its_panels(make_engine) -> None:
    if not cpu_kernels.bf16_blocks_enabled(torch.device("cpu")):
        pytest.skip("bf16 panels read blocks with AVX512-BF16 or AMX only")
    model = make_engine(dtype="bfloat16", device="cpu").runner.model
    packed = [m.packed for m in model.modules() if isinstance(m, LinearBase)]
    assert all(isinstance(p, Panel) and p.blocks is not None and p.blocks.bits == 4 for p in packed)
    head = model.lm_head.packed
    assert isinstance(head, Panel) and head.blocks is not None and head.blocks.bits == 8
    assert model.embed_tokens.weight.dtype == torch.bfloat16
