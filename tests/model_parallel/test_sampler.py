"""The batched sampler: each processor's effect, and seeded rows independent of their batch."""

from __future__ import annotations

import torch

from model_parallel.request import SamplingParams, Sequence
from model_parallel.sampler import Sampler, SamplingMetadata

V = 8
EOS = (7,)


def seqs(*params: SamplingParams, outputs: list[int] | None = None) -> list[Sequence]:
    out = []
    for i, p in enumerate(params):
        s = Sequence(i, f"r{i}", 0, [0, 1], 2, p)
        s.token_ids += outputs or []
        if p.seed is not None:
            s.generator = torch.Generator().manual_seed(p.seed)
        out.append(s)
    return out


def sample(logits: torch.Tensor, batch: list[Sequence]) -> list[int]:
    return Sampler()(
        logits.clone(), SamplingMetadata.build(batch, V, EOS, torch.device("cpu"))
    ).token_ids


def test_greedy_takes_the_first_of_tied_maxima_as_argmax_does() -> None:
    logits = torch.tensor([[1.0, 3, 3, 0, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    nan = torch.full((1, V), float("nan"))
    logits = torch.cat([logits, nan, torch.full((1, V), float("-inf"))])
    greedy = [SamplingParams(temperature=0)] * 4
    assert sample(logits, seqs(*greedy)) == logits.argmax(-1).tolist() == [1, 0, 0, 0]


def test_greedy_and_logit_bias_force_and_ban() -> None:
    logits = torch.arange(V, dtype=torch.float32).repeat(3, 1)
    batch = seqs(
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias={2: 100}),
        SamplingParams(temperature=0, logit_bias={7: -100, 6: -100}),
    )
    assert sample(logits, batch) == [7, 2, 5]


def test_min_tokens_bans_eos_and_stop_ids() -> None:
    logits = torch.arange(V, dtype=torch.float32).repeat(1, 1)
    assert sample(
        logits, seqs(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]))
    ) == [5]


def test_top_k_top_p_min_p_keep_only_the_head() -> None:
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]).repeat(3, 1)
    batch = seqs(SamplingParams(top_k=1), SamplingParams(top_p=0.5), SamplingParams(min_p=0.9))
    for _ in range(20):
        assert sample(logits, batch) == [0, 0, 0]


def test_penalties_follow_the_openai_and_vllm_formulas() -> None:
    logits = torch.tensor([[2.0, 2.0, -1.0, 0, 0, 0, 0, 0]])
    s = seqs(
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0),
        outputs=[0, 0, 2],
    )[0]
    md = SamplingMetadata.build([s], V, EOS, torch.device("cpu"))
    out = Sampler._process(logits.clone(), md)
    # token 0: output twice -> 2/2 - 0.5*2 - 0.25; token 1: prompt -> 2/2; token 2: -1*2 - 0.75
    assert torch.allclose(out[0, :3], torch.tensor([-0.25, 1.0, -2.75]))


def test_seeded_rows_ignore_their_neighbours() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    alone = [sample(logits[2:3], seqs(SamplingParams(seed=11)))[0] for _ in range(5)]
    crowd = [
        sample(
            logits,
            seqs(
                SamplingParams(),
                SamplingParams(temperature=0.5),
                SamplingParams(seed=11),
                SamplingParams(),
            ),
        )[2]
        for _ in range(5)
    ]
    assert alone == crowd


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    logits = probs.log().repeat(4000, 1)
    batch = seqs(*[SamplingParams()] * 4000)
    counts = torch.bincount(torch.tensor(sample(logits, batch)), minlength=V) / 4000
    assert torch.allclose(counts[:3], probs[:3], atol=0.04) and counts[3:].sum() == 0


def test_logprobs_are_raw_log_softmax_with_top_k() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0, 0, 0, 0, 0]])
    md = SamplingMetadata.build(
        seqs(SamplingParams(temperature=0, logprobs=2)), V, EOS, torch.device("cpu")
    )
    out = Sampler()(logits.clone(), md)
    ref = logits.log_softmax(-1)[0]
    chosen, top = out.logprobs[0]
    assert chosen.token_id == 1 and abs(chosen.logprob - ref[1].item()) < 1e-6
    assert [t.token_id for t in top] == [1, 2]
