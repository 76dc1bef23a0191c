"""The decoder stack in one C call (models/cpu_forward.py) gives the module forward's bits: every
step's logits over chunked prefills, prefix-cache hits and decodes, in each dtype `auto` can pick
and in w4a8, on each kernel set the CPU has."""

from __future__ import annotations

import pytest
import torch

from model_parallel.request import SamplingParams
from tests.conftest import run_all

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("kernel_isa")]


@pytest.mark.parametrize(
    "dtype, quantization",
    [("float32", "none"), ("bfloat16", "none"), ("float32", "w4a8"), ("bfloat16", "w4a8")],
)
def test_one_call_forward_gives_the_module_forwards_bits(
    make_engine, prompts, dtype: str, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(dtype, quantization, max_num_batched_tokens=48)
    runner, one_call = engine.runner, engine.runner.cpu_forward
    assert one_call is not None
    logits: list[torch.Tensor] = []
    forward = runner.forward
    monkeypatch.setattr(
        runner, "forward", lambda inputs: logits.append(forward(inputs)) or logits[-1]
    )
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    requests = {f"r{i}": (p, params) for i, p in enumerate(prompts[:4] + prompts[:1])}
    arrivals = {0: ["r0", "r1"], 2: ["r2", "r3"], 9: ["r4"]}  # r4: r0's prompt, from the cache

    def run() -> list[torch.Tensor]:
        engine.block_manager.reset_prefix_cache()
        logits.clear()
        run_all(engine, requests, arrivals)
        return list(logits)

    fused = run()
    runner.cpu_forward = None
    try:
        modules = run()
    finally:
        runner.cpu_forward = one_call
    assert len(fused) == len(modules) > 10
    assert all(torch.equal(a, b) for a, b in zip(fused, modules))
