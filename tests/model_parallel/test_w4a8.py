"""`--quantization w4a8`: the kernel computes what it says (activations rounded per 32 inputs, then
an exact product), the same bits on every instruction set and whatever rows share the call; and
on the default model its greedy output and logprobs stay close to the exact fp32 path, measured
over the parity prompts (the figures are in the README)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from model_parallel.layers import cpu_kernels
from model_parallel.layers.w4a8 import W4A8, to_w4a8
from model_parallel.request import SamplingParams
from tests.conftest import run_all

ROWS = [1, 2, 5, 6, 7, 13, 32, 67]


def gguf_weight(kind: str = "Q4_1", out: int = 96, inputs: int = 256) -> torch.Tensor:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out, inputs)).astype(np.float32) * 0.05
    q = GGMLQuantizationType[kind]
    return torch.from_numpy(dequantize(quantize(w, q), q).astype(np.float32))


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies: each 32 inputs as dx * qx, qx in -127..127."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.where(d > 0, blocks / d, 0).round() * d).view_as(x)


@pytest.mark.usefixtures("kernel_isa")
@pytest.mark.parametrize(("kind", "bits"), [("Q4_1", 4), ("Q8_0", 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_product_of_rounded_activations_and_rows_independent(
    kind: str, bits: int, bias: bool
) -> None:
    w = gguf_weight(kind)
    packed = to_w4a8(w)
    assert isinstance(packed, W4A8) and packed.bits == bits
    torch.manual_seed(0)
    b = torch.randn(w.shape[0]) if bias else None
    x = torch.randn(max(ROWS), w.shape[1]) * torch.logspace(-3, 3, max(ROWS))[:, None]
    x[3] = 0  # a row whose scale is 0
    full = cpu_kernels.linear(x, packed, b)
    ref = rounded_activations(x).double() @ w.double().T + (b.double() if bias else 0)
    assert ((full - ref).abs() <= 1e-5 * ref.abs().amax(-1, keepdim=True)).all()
    for rows in ROWS:
        assert torch.equal(cpu_kernels.linear(x[:rows], packed, b), full[:rows]), rows
    assert cpu_kernels.linear(x[:0], packed, b).shape == (0, w.shape[0])
    # a bf16 model's rows: the fp32 path's result on the same values, rounded once
    xb, bb = x.bfloat16(), None if b is None else b.bfloat16()
    wide = cpu_kernels.linear(xb.float(), packed, None if bb is None else bb.float())
    assert torch.equal(cpu_kernels.linear(xb, packed, bb), wide.bfloat16())
    for rows in ROWS:
        assert torch.equal(cpu_kernels.linear(xb[:rows], packed, bb), wide[:rows].bfloat16())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_same_bits_on_every_instruction_set(kind: str, use_kernels: Callable[[str], None]) -> None:
    isas = [s for s in cpu_kernels.supported_isas() if s != "baseline"]
    if len(isas) < 2 or cpu_kernels.library(isas[0]) is None:
        pytest.skip("one instruction set (or none) with the kernels on this CPU")
    packed, x = to_w4a8(gguf_weight(kind)), torch.randn(9, 256)
    results = []
    for isa in isas:
        use_kernels(isa)
        results.append(
            [cpu_kernels.linear(x.to(t), packed, None) for t in (torch.float32, torch.bfloat16)]
        )
    assert all(torch.equal(a, b) for r in results for a, b in zip(r, results[0]))


def test_only_gguf_block_weights_take_the_form() -> None:
    assert to_w4a8(torch.randn(96, 256)) is None
    assert to_w4a8(gguf_weight().bfloat16()) is None
    assert to_w4a8(gguf_weight()[:, :80]) is None


def chosen(outputs: list) -> list[tuple[int, float]]:
    return [
        (t, lp.chosen.logprob)
        for o in outputs
        for c in o.outputs
        for t, lp in zip(c.token_ids, c.logprobs)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_stays_close_to_fp32(make_engine, engine_fp32, prompts, dtype) -> None:
    """Greedy over the parity prompts, with fp32 or bf16 around the integer linears: where both
    have seen the same tokens, the chosen tokens' logprobs differ by little from the exact fp32
    path's, and the continuations agree for a while."""
    engine = make_engine(dtype, quantization="w4a8")
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=0)
    reqs = {f"p{i}": (p, params) for i, p in enumerate(prompts)}
    exact, approx = run_all(engine_fp32, reqs), run_all(engine, reqs)
    same, worst, agreed = 0, 0.0, []
    for rid in reqs:
        a, b = chosen(exact[rid]), chosen(approx[rid])
        same += [t for t, _ in a] == [t for t, _ in b]
        agreed.append(0)
        for (ta, la), (tb, lb) in zip(a, b):  # the same context so far: logprobs compare
            worst = max(worst, abs(la - lb))
            if ta != tb:
                break
            agreed[-1] += 1
    # measured on the 135M default model (Q4_1, a Q8_0 LM head; Zen 4, 2026-12-04): in fp32 3 of
    # 8 continuations whole, the first difference after 0, 1, 32, 9, 6, 9, 32, 6 tokens, max
    # |dlogprob| 0.185; in bf16 1 of 8, after 0, 21, 32, 9, 6, 2, 13, 6, 0.189 (bf16 without
    # w4a8: 6 of 8, 0.149). At the first difference the two top tokens are within that of each other
    print(f"w4a8 {dtype}: {same}/{len(reqs)} continuations equal; agreed {agreed}; {worst=:.3f}")
    assert worst < 0.5
    assert sum(agreed) >= 4 * len(reqs)
