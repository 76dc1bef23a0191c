"""The dense CPU linears (panel weights, our C kernels), on every instruction set the CPU has, in
fp32 and bf16: the product of F.linear to rounding, and each row's result the same bits whatever
rows share the call (what batch-invariant greedy decoding rests on; oneDNN's packed weights failed
that on an AVX512 CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_parallel.layers.linear import linear, pack_weight
from model_parallel.layers.panel import Panel

ROWS = [1, 2, 3, 5, 6, 7, 8, 9, 13, 17, 32, 67]  # every way the kernels tile rows


@pytest.mark.usefixtures("kernel_isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features", [(3072, 576), (576, 1536), (192, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_weight_matches_f_linear_and_is_row_independent(
    dtype: torch.dtype, out_features: int, in_features: int, bias: bool
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    packed = pack_weight(weight)
    assert isinstance(packed, Panel)
    x = torch.randn(max(ROWS), in_features).to(dtype)
    full = linear(x, weight, packed, b)
    ref = x.double() @ weight.double().T + (b.double() if bias else 0)
    # fp32: a rounding per add over k; bf16: the one rounding of the output, as F.linear's
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert (full.double() - ref).abs().max() <= tol * ref.abs().max()
    if dtype == torch.bfloat16:  # no worse than torch's own bf16 matmul
        torch_err = (F.linear(x, weight, b).double() - ref).abs().max()
        assert (full.double() - ref).abs().max() <= torch_err
    for rows in ROWS:
        assert torch.equal(linear(x[:rows], weight, packed, b), full[:rows]), rows
    assert torch.equal(linear(x[5:6], weight, packed, b), full[5:6])
    assert linear(x[:0], weight, packed, b).shape == (0, out_features)


def test_only_shapes_and_dtypes_the_kernels_tile_are_packed(kernel_isa: str) -> None:
    assert pack_weight(torch.zeros(64, 64, dtype=torch.float16)) is None
    assert pack_weight(torch.zeros(56, 64)) is None  # fp32 tiles are 16 features
    assert pack_weight(torch.zeros(96, 64, dtype=torch.bfloat16)) is None  # bf16 tiles: 64
    assert pack_weight(torch.zeros(64, 48)) is None  # inputs: a multiple of 32
