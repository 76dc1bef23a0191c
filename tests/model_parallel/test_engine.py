"""The engine end to end on the real default model: sampling features, stops, logprobs, n, aborts,
validation, batch invariance and the async surface."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from model_parallel.async_engine import AsyncEngine, ProcessEngine
from model_parallel.engine import EngineDeadError
from model_parallel.request import SamplingParams
from model_parallel.structured import StructuredOutputSpec
from tests.conftest import SMALL_KV_GIB, assert_pool_full, run_all, text_of, tokens_of

pytestmark = pytest.mark.slow


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, **kw})


def test_seeded_sampling_same_alone_and_in_a_busy_batch(engine_fp32, prompts) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20)
    alone = tokens_of(run_all(engine_fp32, {"s": (prompts[1], seeded)})["s"])
    busy = {
        f"b{i}": (p, SamplingParams(temperature=1.0, max_tokens=20)) for i, p in enumerate(prompts)
    }
    busy["s"] = (prompts[1], seeded)
    crowd = run_all(engine_fp32, busy, {0: list(busy)[:4], 2: list(busy)[4:]})
    assert tokens_of(crowd["s"]) == alone
    other = run_all(engine_fp32, {"s": (prompts[1], SamplingParams(seed=99, max_tokens=20))})["s"]
    assert tokens_of(other) != alone


def test_stop_string_across_token_boundary(engine_fp32, prompts, tokenizer) -> None:
    full = run_all(engine_fp32, {"f": (prompts[0], greedy())})["f"]
    text, ids = text_of(full), tokens_of(full)
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids))]
    cut = len(pieces[3]) - 2  # a stop string that starts inside one token and ends in the next
    stop = text[cut : cut + 5]
    out = run_all(engine_fp32, {"s": (prompts[0], greedy(stop=[stop]))})["s"]
    assert text_of(out) == text[: text.index(stop)]
    assert out[-1].outputs[-1].finish_reason == "stop" and out[-1].outputs[-1].stop_reason == stop


def test_logit_bias_forces_and_bans(engine_fp32, prompts) -> None:
    forced = run_all(engine_fp32, {"f": (prompts[0], greedy(max_tokens=5, logit_bias={42: 100}))})
    assert tokens_of(forced["f"]) == [42] * 5
    plain = tokens_of(run_all(engine_fp32, {"p": (prompts[0], greedy(max_tokens=3))})["p"])
    banned = run_all(
        engine_fp32, {"b": (prompts[0], greedy(max_tokens=3, logit_bias={plain[0]: -100}))}
    )
    assert tokens_of(banned["b"])[0] != plain[0]


def test_logprobs_equal_log_softmax_of_reference_logits(engine_fp32, hf_model, prompts) -> None:
    out = run_all(engine_fp32, {"l": (prompts[2], greedy(max_tokens=8, logprobs=5))})["l"]
    ids = tokens_of(out)
    lps = [lp for o in out for c in o.outputs for lp in c.logprobs]
    with torch.inference_mode():
        ref = hf_model(torch.tensor([prompts[2] + ids])).logits[0].log_softmax(-1)
    start = len(prompts[2]) - 1
    for i, (token, lp) in enumerate(zip(ids, lps)):
        row = ref[start + i]
        assert lp.chosen.token_id == token
        assert abs(lp.chosen.logprob - row[token].item()) < 1e-3
        assert [t.token_id for t in lp.top] == row.topk(5).indices.tolist()


def test_length_min_tokens_and_ignore_eos(engine_fp32, prompts) -> None:
    out = run_all(
        engine_fp32,
        {
            "a": (prompts[3], greedy(max_tokens=4)),
            "b": (prompts[4], greedy(max_tokens=40, min_tokens=30, ignore_eos=True)),
        },
    )
    assert len(tokens_of(out["a"])) == 4 and out["a"][-1].outputs[-1].finish_reason == "length"
    assert len(tokens_of(out["b"])) == 40 and out["b"][-1].num_output_tokens == 40


def test_n_sequences_share_the_prompt_blocks(engine_fp32, prompts) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12)
    out = run_all(engine_fp32, {"n": (prompts[5] * 3, params)})["n"]
    texts = [tokens_of(out, i) for i in range(3)]
    assert all(len(t) > 0 for t in texts) and len({tuple(t) for t in texts}) > 1
    assert out[-1].finished and out[-1].num_output_tokens == sum(len(t) for t in texts)
    hits = engine_fp32.scheduler.prefix_hit_tokens
    assert hits >= 2 * (len(prompts[5] * 3) - 1) // 16 * 16  # siblings 1 and 2 hit every full block


def test_abort_mid_generation_frees_blocks(engine_fp32, prompts) -> None:
    for i, p in enumerate(prompts[:4]):
        engine_fp32.add_request(f"a{i}", p, greedy(max_tokens=50))
    for _ in range(3):
        engine_fp32.step()
    for i in range(4):
        out = engine_fp32.abort_request(f"a{i}")
        assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine_fp32.has_unfinished()
    assert_pool_full(engine_fp32)


@pytest.mark.parametrize(
    "params",
    [
        greedy(max_tokens=30, repetition_penalty=1.3, stop=["\n\n"]),
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, frequency_penalty=0.5, max_tokens=30),
        greedy(max_tokens=40, structured=StructuredOutputSpec("json_object", "")),
    ],
    ids=["greedy-penalized", "seeded", "json"],
)
def test_a_continued_request_goes_on_as_the_original(engine_fp32, prompts, params) -> None:
    """What a replica's successor does with the tokens a client already has: the rest of the
    tokens and text are those the undisturbed request would have produced."""
    full = run_all(engine_fp32, {"f": (prompts[2], params)})["f"]
    ids = tokens_of(full)
    k = len(ids) // 2
    sent = "".join(c.text for o in full[:k] for c in o.outputs)
    rest = run_all(engine_fp32, {"c": (prompts[2], params, ids[:k])})["c"]
    assert ids[:k] + tokens_of(rest) == ids
    assert sent + text_of(rest) == text_of(full)
    assert rest[-1].num_output_tokens == full[-1].num_output_tokens
    assert rest[-1].outputs[-1].finish_reason == full[-1].outputs[-1].finish_reason


def test_random_arrivals_aborts_and_preemptions_leave_the_pool_full(make_engine) -> None:
    """A small pool (preemptions), n > 1, grammars, and aborts at any moment: whatever happens,
    every block comes back."""
    rng = random.Random(1)
    engine = make_engine(num_blocks=16, max_num_seqs=8, max_num_batched_tokens=64)
    base = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    live: set[str] = set()
    for step in range(150):
        if rng.random() < 0.3 and len(live) < 12:
            rid = f"r{step}"
            engine.add_request(
                rid,
                base + [rng.randrange(1000, 2000) for _ in range(rng.randrange(40))],
                SamplingParams(
                    n=rng.choice([1, 1, 2, 3]),
                    temperature=rng.choice([0.0, 1.0]),
                    seed=step,
                    max_tokens=rng.randrange(1, 40),
                    structured=StructuredOutputSpec("json_object", "")
                    if rng.random() < 0.1
                    else None,
                ),
            )
            live.add(rid)
        if live and rng.random() < 0.15:
            rid = rng.choice(sorted(live))
            engine.abort_request(rid)
            live.discard(rid)
        live -= {out.request_id for out in engine.step() if out.finished}
    for rid in live:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert_pool_full(engine)


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(temperature=3.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(presence_penalty=-2.5), "presence_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(logit_bias={5: 101.0}), "logit_bias"),
    ],
)
def test_invalid_sampling_params_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**params)


def test_oversized_prompts_are_refused_with_both_numbers(make_engine) -> None:
    engine = make_engine(num_blocks=4)
    with pytest.raises(ValueError, match=r"has 100 tokens.*holds 64 tokens"):
        engine.add_request("x", [5] * 100, greedy())
    with pytest.raises(ValueError, match=r"has 9000 tokens.*context length is 8192"):
        engine.add_request("y", [5] * 9000, greedy())
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("z", [5], greedy(logit_bias={10**6: 1.0}))
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [("float32", "none"), ("bfloat16", "none"), ("float32", "w4a8"), ("bfloat16", "w4a8")],
)
def test_batch_invariance_greedy_alone_vs_full_chunked_batch(
    make_engine, prompts, dtype, quantization
) -> None:
    """In every dtype `auto` picks on CPU (bf16 with AVX512-BF16 or AMX, else fp32), and w4a8 in
    both: a request's greedy output must not depend on its batch. CPU only: on CUDA, cuBLAS and
    SDPA pick kernels by shape (README)."""
    engine = make_engine(
        dtype=dtype, quantization=quantization, max_num_batched_tokens=64, device="cpu"
    )
    alone = {
        i: tokens_of(run_all(engine, {"x": (p, greedy(max_tokens=32))})["x"])
        for i, p in enumerate(prompts)
    }
    reqs = {f"r{i}": (p, greedy(max_tokens=32)) for i, p in enumerate(prompts * 3)}
    arrivals = {i: [f"r{i}"] for i in range(len(reqs))}
    crowd = run_all(engine, reqs, arrivals)
    for i in range(len(reqs)):
        assert tokens_of(crowd[f"r{i}"]) == alone[i % len(prompts)], f"request {i}"


def test_async_engine_streams_concurrently_and_aborts_on_close(prompts) -> None:
    from model_parallel.config import CacheConfig, EngineConfig

    engine = AsyncEngine(EngineConfig(cache=CacheConfig(kv_cache_memory_gib=SMALL_KV_GIB)))

    async def collect(rid: str, p: list[int]) -> str:
        return "".join(
            [
                c.text
                async for o in engine.generate(rid, p, greedy(max_tokens=16))
                for c in o.outputs
            ]
        )

    async def main() -> None:
        texts = await asyncio.gather(*(collect(f"c{i}", p) for i, p in enumerate(prompts[:6])))
        assert all(texts)
        gen = engine.generate("drop", prompts[0], greedy(max_tokens=200))
        await gen.__anext__()
        await gen.aclose()  # a client that went away
        for _ in range(100):
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        with pytest.raises(ValueError, match="temperature|prompt"):
            async for _ in engine.generate("bad", [], greedy()):
                pass

    try:
        asyncio.run(main())
        assert_pool_full(engine.engine)
        engine.check_health()
    finally:
        engine.shutdown()


def test_process_engine_streams_refuses_and_aborts(prompts) -> None:  # noqa: ANN001
    from model_parallel.config import CacheConfig, EngineConfig

    engine = ProcessEngine(EngineConfig(cache=CacheConfig(kv_cache_memory_gib=SMALL_KV_GIB)))

    async def collect(rid: str, p: list[int]) -> list[int]:
        return [
            t
            async for o in engine.generate(rid, p, greedy(max_tokens=8))
            for c in o.outputs
            for t in c.token_ids
        ]

    async def main() -> None:
        outs = await asyncio.gather(*(collect(f"p{i}", p) for i, p in enumerate(prompts[:4])))
        assert all(len(o) > 0 for o in outs)
        gen = engine.generate("drop", prompts[0], greedy(max_tokens=500))
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.1)
            if engine.stats().get("num_running") == 0 and engine.stats()["kv_blocks_used"] == 0:
                break
        assert engine.stats()["kv_blocks_used"] == 0
        with pytest.raises(ValueError, match="prompt"):
            async for _ in engine.generate("bad", [5] * 9000, greedy()):
                pass

    async def killed_mid_stream() -> None:
        gen = engine.generate("killed", prompts[0], greedy(max_tokens=500))
        await gen.__anext__()
        engine._proc.kill()
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass

    try:
        asyncio.run(main())
        engine.check_health()
        # A second loop reads the results once the first is closed: the same greedy tokens.
        first = asyncio.run(collect("again0", prompts[0]))
        assert first == asyncio.run(collect("again1", prompts[0]))
        asyncio.run(asyncio.wait_for(killed_mid_stream(), 30))
    finally:
        engine.shutdown()
    with pytest.raises(EngineDeadError):
        engine.check_health()
