"""The oneDNN-packed CPU weights `linear` uses: the same product as F.linear, and each row's result
independent of how many rows share the call (what batch-invariant greedy decoding rests on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_parallel.layers.linear import linear, pack_weight


@pytest.mark.parametrize("out_features, in_features", [(3072, 576), (576, 1536)])
def test_packed_fp32_weight_matches_f_linear_and_is_row_independent(
    out_features: int, in_features: int
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    packed = pack_weight(weight)
    if packed is None:
        pytest.skip("oneDNN cannot pack fp32 weights on this CPU")
    x = torch.randn(64, in_features)
    full = linear(x, weight, packed)
    torch.testing.assert_close(full, F.linear(x, weight), rtol=1e-4, atol=1e-4)
    for rows in (1, 3, 8, 17, 32):
        assert torch.equal(linear(x[:rows], weight, packed), full[:rows]), rows


def test_only_cpu_float_weights_are_packed() -> None:
    assert pack_weight(torch.zeros(8, 8, dtype=torch.float16)) is None
