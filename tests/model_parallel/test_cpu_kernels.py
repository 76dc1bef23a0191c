"""The C kernels of the CPU decode step against the torch paths they replace (which CUDA keeps),
in fp32 and bf16 and on every instruction set the CPU has: rotary exactly, RMSNorm and paged
decode attention to rounding; each row's result independent of the rest of the batch; and the
build cache, the pick of instruction set and the opt-out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from model_parallel.forward_context import (
    AttentionMetadata,
    ForwardContext,
    PrefillChunk,
    decode_mask,
    kernel_rows,
)
from model_parallel.layers import cpu_kernels
from model_parallel.layers.attention import PagedAttention
from model_parallel.layers.norm import RMSNorm, silu_and_mul
from model_parallel.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.usefixtures("kernel_isa")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def torch_paths(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], Any]], Any]:
    """Runs a callable with the kernels switched off: the layers' torch paths."""

    def run(fn: Callable[[], Any]) -> Any:
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "enabled", lambda device, dtype: False)
            return fn()

    return run


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_bit_identical_in_place_on_qkv_views(dtype: torch.dtype, torch_paths) -> None:
    torch.manual_seed(0)
    heads, kv_heads, d, t = 9, 3, 64, 70  # 70 tokens: the kernel's threaded branch
    rotary = RotaryEmbedding(
        d,
        4096,
        10000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    ).to(dtype)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, dtype=dtype)
    positions = torch.randint(0, 4096, (t,))

    def views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = x.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        return q.view(t, heads, d), k.view(t, kv_heads, d)

    want = torch_paths(lambda: rotary(positions, *views(qkv.clone())))
    got_qkv = qkv.clone()
    got = rotary(positions, *views(got_qkv))
    assert got[0].data_ptr() == got_qkv.data_ptr()  # rotated in place
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got_qkv[:, (heads + kv_heads) * d :], qkv[:, (heads + kv_heads) * d :])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_the_torch_path(
    dtype: torch.dtype, with_residual: bool, torch_paths
) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x, residual = torch.randn(2, 100, 576, dtype=dtype)
    res = residual if with_residual else None
    want = torch_paths(lambda: norm(x.clone(), None if res is None else res.clone()))
    got_x, got_res = x.clone(), None if res is None else res.clone()
    got = norm(got_x, got_res)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # the sum: exact
        assert got[1].data_ptr() == got_res.data_ptr() and got[0].data_ptr() == got_x.data_ptr()
        got, want = got[0], want[0]
    else:
        assert torch.equal(got_x, x)  # the input is left alone
    # The sum of squares may differ in its last bit (summation order): one rounding step.
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch_and_rows_are_independent(
    dtype: torch.dtype, torch_paths
) -> None:
    """SwiGLU over 40 rows (the kernel's threaded branch) of 1,541 features (not whole vectors),
    with values to +-100 (where exp would overflow as e^-x): torch's two roundings, its exp within
    an ulp; a row alone gives the bits it gets among the others."""
    torch.manual_seed(0)
    x = (torch.randn(40, 2 * 1541) * torch.tensor([1.0, 30.0]).repeat_interleave(1541)).to(dtype)
    x[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])
    want = torch_paths(lambda: silu_and_mul(x))
    got = silu_and_mul(x)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert all(torch.equal(silu_and_mul(x[i : i + 1]), got[i : i + 1]) for i in (0, 17, 39))


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_is_torchs_first_maximum_and_first_nan(dtype: torch.dtype) -> None:
    """Greedy's argmax over rows of every length a vector splits unevenly (and a vocabulary's):
    ties go to the first, a NaN anywhere wins (the first one), an all -inf row gives 0."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 15, 17, 64, 65, 49157):
        x = torch.randn(9, n, generator=gen).to(dtype)
        x[1] = float("-inf")
        x[2] = 1.0
        x[3, ::3] = 7.0
        x[4, -1] = float("inf")
        x[5, n // 2 :] = float("nan")
        x[6, 0] = float("nan")
        x[7, -1] = float("nan")
        assert cpu_kernels.argmax(x).tolist() == x.max(-1).indices.tolist(), n


def _decode_attention(
    dtype: torch.dtype,
    context_lens: list[int],
    num_blocks: int = 256,
    shape: tuple[int, int, int] = (9, 3, 64),
) -> tuple[PagedAttention, AttentionMetadata, torch.Tensor]:
    """A PagedAttention with random caches and random block tables, and its decode metadata;
    shape: heads, KV heads, head_dim."""
    (heads, kv_heads, d), bs = shape, 16
    gen = torch.Generator().manual_seed(1)
    attn = PagedAttention(heads, kv_heads, d, ForwardContext())  # decodes only: no new K/V
    attn.k_cache = torch.randn(num_blocks, bs, kv_heads, d, generator=gen).to(dtype)
    attn.v_cache = torch.randn(num_blocks, bs, kv_heads, d, generator=gen).to(dtype)
    width = max(-(-n // bs) for n in context_lens)
    tables = torch.randperm(num_blocks, generator=gen)[: len(context_lens) * width]
    tables = tables.view(len(context_lens), width)
    lens = torch.tensor(context_lens)
    md = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode_tokens=len(context_lens),
        decode_block_tables=tables,
        decode_context_lens=lens,
        decode_mask=decode_mask(lens - 1, width * bs, dtype),
    )
    qkv = torch.randn(len(context_lens), (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    q = qkv[:, : heads * d].view(-1, heads, d)  # a strided view, as in the model
    return attn, md, q


def _run_decode(attn: PagedAttention, md: AttentionMetadata, q: torch.Tensor) -> torch.Tensor:
    no_new_kv = torch.empty(0, attn.num_kv_heads, attn.head_dim, dtype=q.dtype)
    md.kernel_rows = kernel_rows(md, q.device)  # what the model runner adds
    with attn.ctx.bind(md):
        return attn(q, no_new_kv, no_new_kv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 3, 64), (8, 2, 128), (12, 4, 80), (5, 5, 36)])
def test_paged_decode_attention_matches_sdpa_over_gathered_blocks(
    dtype: torch.dtype, shape: tuple[int, int, int], torch_paths
) -> None:
    """SmolLM2's heads (the kernel's unrolled copy) and others: wider groups, head_dims that are
    not a whole number of vectors, no grouping"""
    lens = [1, 15, 16, 17, 100, 250, 33, 64]  # ragged, on and off block edges
    attn, md, q = _decode_attention(dtype, lens, shape=shape)
    want = torch_paths(lambda: _run_decode(attn, md, q))
    got = _run_decode(attn, md, q)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_new_keys_and_values_land_in_their_slots_as_index_copy_puts_them(
    dtype: torch.dtype,
) -> None:
    attn, _, _ = _decode_attention(dtype, [1], num_blocks=8)
    kv_heads, d = attn.num_kv_heads, attn.head_dim
    qkv = torch.randn(5, (9 + 2 * kv_heads) * d).to(dtype)  # k and v as views, as in the model
    k = qkv[:, 9 * d : (9 + kv_heads) * d].view(5, kv_heads, d)
    v = qkv[:, (9 + kv_heads) * d :].view(5, kv_heads, d)
    slots = torch.tensor([17, 3, 127, 64, 0])
    want_k, want_v = attn.k_cache.clone(), attn.v_cache.clone()
    want_k.view(-1, kv_heads, d).index_copy_(0, slots, k)
    want_v.view(-1, kv_heads, d).index_copy_(0, slots, v)
    cpu_kernels.write_kv(attn.k_cache, attn.v_cache, k, v, slots)
    assert torch.equal(attn.k_cache, want_k) and torch.equal(attn.v_cache, want_v)


def test_paged_decode_attention_rows_do_not_depend_on_the_batch() -> None:
    lens = [40, 200, 7, 129]
    attn, md, q = _decode_attention(torch.float32, lens)
    full = _run_decode(attn, md, q)
    for i, n in enumerate(lens):
        width = -(-n // 16)
        one = AttentionMetadata(
            slot_mapping=md.slot_mapping,
            num_decode_tokens=1,
            decode_block_tables=md.decode_block_tables[i : i + 1, :width].contiguous(),
            decode_context_lens=md.decode_context_lens[i : i + 1],
        )
        assert torch.equal(_run_decode(attn, one, q[i : i + 1]), full[i : i + 1]), n


def test_the_build_is_cached_and_can_be_capped_or_switched_off(
    kernel_isa: str, use_kernels: Callable[[str], None]
) -> None:
    flags = cpu_kernels.FLAGS + cpu_kernels.ISAS[kernel_isa][0]
    built = cpu_kernels._build(cpu_kernels._compiler(), flags)
    mtime = built.stat().st_mtime_ns
    assert cpu_kernels._build(cpu_kernels._compiler(), flags) == built
    assert built.stat().st_mtime_ns == mtime  # found, not rebuilt
    assert cpu_kernels.isa() == kernel_isa
    assert cpu_kernels.linear_enabled(torch.device("cpu"), torch.bfloat16)
    use_kernels("1")
    assert cpu_kernels.isa() == cpu_kernels.supported_isas()[0]  # the best the CPU has
    use_kernels("sse9")
    with pytest.raises(ValueError, match="LLMCLUSTER_CPU_KERNELS"):
        cpu_kernels.isa()
    use_kernels("0")
    assert not cpu_kernels.enabled(torch.device("cpu"), torch.float32)
    use_kernels("baseline")  # norms and attention, no linears
    assert cpu_kernels.enabled(torch.device("cpu"), torch.float32)
    assert not cpu_kernels.linear_enabled(torch.device("cpu"), torch.float32)
    use_kernels(kernel_isa)
    assert not cpu_kernels.enabled(torch.device("cpu"), torch.float16)
    assert not cpu_kernels.enabled(torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunks_attend_row_by_row_as_decodes_do(dtype: torch.dtype, torch_paths) -> None:
    """A chunk after 37 cached tokens: each of its rows gets the bits it would get as a decode at
    its position, and SDPA's causal result to rounding."""
    attn, _, _ = _decode_attention(dtype, [1])
    heads, kv_heads, d, bs = 9, 3, 64, 16
    n, ctx = 20, 57
    gen = torch.Generator().manual_seed(2)
    table = torch.randperm(attn.k_cache.shape[0], generator=gen)[: -(-ctx // bs)]
    slots = torch.stack([table[p // bs] * bs + p % bs for p in range(ctx - n, ctx)])
    q = torch.randn(n, heads, d, generator=gen).to(dtype)
    k, v = (torch.randn(n, kv_heads, d, generator=gen).to(dtype) for _ in range(2))
    q_pos = torch.arange(ctx - n, ctx)
    mask = torch.arange(ctx)[None, :] <= q_pos[:, None]

    def chunk(with_mask: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=slots,
            prefills=[PrefillChunk(0, n, ctx, table, mask if with_mask else None)],
        )

    def run(md: AttentionMetadata) -> torch.Tensor:
        md.kernel_rows = kernel_rows(md, q.device)
        with attn.ctx.bind(md):
            return attn(q, k, v)

    want = torch_paths(lambda: run(chunk(True)))
    got = run(chunk(False))
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for i in range(n):  # the same rows as decodes, one at a time, their K/V already cached
        one = AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long),
            num_decode_tokens=1,
            decode_block_tables=table[None, : -(-(ctx - n + i + 1) // bs)].contiguous(),
            decode_context_lens=torch.tensor([ctx - n + i + 1]),
        )
        assert torch.equal(_run_decode(attn, one, q[i : i + 1]), got[i : i + 1]), i
