"""The CPU kernels of cpu_kernels.c and cpu_linear.c: built with the system C compiler on first
use (a second or two), once per instruction set, cached per source, compiler and flags, and called
through ctypes. Without a compiler, or with LLMCLUSTER_CPU_KERNELS=0, the layers keep their torch
paths (F.linear, SDPA), which CUDA always uses.

The instruction set is picked at run time from the CPU's flags: `avx2` (x86-64-v3: AVX2, FMA)
runs on every x86 we meet; `avx512` (x86-64-v4 with AVX512-BF16 and VNNI, e.g. Zen 4) adds the
vdpbf16ps bf16 and vpdpbusd w4a8 linears; `amx` (Sapphire Rapids and later Xeons) runs the bf16
linears on AMX tiles. LLMCLUSTER_CPU_KERNELS=avx2 (or avx512) caps the pick; the tests run each
set the CPU has. Each set's kernels are batch-invariant on their own; two sets may differ in the
last bits (w4a8 excepted: the same bits on all).

They pay at decode's small batches, where a step is a few hundred torch ops on small tensors plus
attention that gathers every sequence's KV blocks into a padded copy first."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from model_parallel.layers.block_quant import BlockQuantized
from model_parallel.layers.panel import Panel
from model_parallel.layers.w4a8 import W4A8
from model_parallel.loader import default_cache_dir

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_suffix(".c")] + [
    Path(__file__).with_name(f"{name}.c")
    for name in ("cpu_linear", "amx_linear", "w4a8", "cpu_model")
]
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
_AVX512 = (
    ["-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"],
    {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16", "avx512_vnni"},
)
# best first: each set's compiler flags and the /proc/cpuinfo flags it needs
ISAS = {
    "amx": (_AVX512[0] + ["-mamx-tile", "-mamx-bf16"], _AVX512[1] | {"amx_tile", "amx_bf16"}),
    "avx512": _AVX512,
    "avx2": (
        ["-march=x86-64-v3"],
        {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "xsave"},
    ),
    "baseline": ([], set()),
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "decode_attention": [_P, _P, ctypes.c_int64] + [_P] * 4 + [_I] * 6 + [_F, _I],
    "rotary": [_P, ctypes.c_int64, _I, _I, _I, _P, _P, _P, _I],
    "write_kv": [_P] * 4 + [ctypes.c_int64, _P, _I, _I],
    "add_rms_norm": [_P] * 4 + [_I, _I, _F, _I],
    "silu_and_mul": [_P, _P, _I, _I, _I],
    "argmax": [_P, _P, _I, _I, _I],
}
_LINEARS = {  # built only where the set has AVX2 and FMA
    "block_quant_linear_f32": [_P, _P, _I, _I, _P, _I, _I, _P, _I],
    "panel_linear_f32": [_P, _P, _I, _I, _P, _I, _P, _I],
    "panel_linear_bf16": [_P, _P, _I, _I, _P, _I, _P, _I, _P, _I],
    "w4a8_linear_f32": [_P, _P, _I, _I, _P, _I, _I, _P, _I],
    "w4a8_linear_bf16": [_P, _P, _I, _I, _P, _I, _I, _P, _I],
    # the decoder stack (cpu_model.c): model, x, residual, tokens, positions, slots, attention
    # row groups and their number, four scratch buffers, threads
    **{
        f"llama_forward_{s}": [_P] * 3 + [_I] + [_P] * 3 + [_I] + [_P] * 4 + [_I]
        for s in _SUFFIX.values()
    },
}


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The instruction sets this CPU runs, best first (always ends with `baseline`)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = set(next((ln for ln in lines if ln.startswith("flags")), "").split())
    except OSError:
        flags = set()
    return tuple(name for name, (_, needs) in ISAS.items() if needs <= flags)


def isa() -> str | None:
    """The set the kernels run on: the best this CPU has, at most LLMCLUSTER_CPU_KERNELS's; None
    when the kernels are off."""
    return _pick(setting())


@functools.cache
def setting() -> str:
    """LLMCLUSTER_CPU_KERNELS as the process's first kernel call found it: every call asks, and an
    environment lookup each cost ~1.5 ms of a 28 ms one-stream decode step. After changing the
    variable, `setting.cache_clear()`."""
    return os.environ.get("LLMCLUSTER_CPU_KERNELS", "1")


@functools.cache
def _pick(choice: str) -> str | None:
    """Once per setting: every kernel call asks."""
    if choice == "0":
        return None
    supported = supported_isas()
    if choice in ("1", ""):
        return supported[0]
    if choice not in ISAS:
        raise ValueError(f"LLMCLUSTER_CPU_KERNELS must be 0, 1 or one of {', '.join(ISAS)}")
    return next(s for s in supported if list(ISAS).index(s) >= list(ISAS).index(choice))


def _build(compiler: str, flags: list[str]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([*(s.read_text() for s in SOURCES), " ".join(flags), version]).encode()
    ).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place: ranks and replicas that start together may all build.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, *map(str, SOURCES), "-o", str(out), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(out, target)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The kernels built for instruction set `name` (one this CPU runs)."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU decode runs on the slower torch paths")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, FLAGS + ISAS[name][0])))  # shares torch's libgomp
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernels unavailable (%s): using the torch paths", detail)
        return None
    for kernel, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            getattr(lib, f"{kernel}_{suffix}").argtypes = argtypes
    for kernel, argtypes in _LINEARS.items():
        if hasattr(lib, kernel):
            getattr(lib, kernel).argtypes = argtypes
    return lib


def _library() -> ctypes.CDLL | None:
    name = isa()
    return None if name is None else library(name)


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _SUFFIX and _library() is not None


def linear_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `linear` runs weights of this dtype (the AVX2 and AVX512 sets)."""
    return enabled(device, dtype) and hasattr(_library(), "panel_linear_f32")


def bf16_blocks_enabled(device: torch.device) -> bool:
    """Whether bf16 panels can read a GGUF's blocks instead at few rows (AVX512-BF16 and AMX)."""
    return linear_enabled(device, torch.bfloat16) and hasattr(_library(), "expand_bf16_block")


def kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    """The library in use's `name` kernel for dtype (cpu_model.c's llama_forward too)."""
    return getattr(_library(), f"{name}_{_SUFFIX[dtype]}")


def decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Into out [B, heads * d] (contiguous); q: [B, heads, d], heads and elements contiguous;
    caches: [blocks, block_size, kv_heads, d]; block_tables: [B, W], context_lens: [B] int64."""
    b, heads, d = q.shape
    assert out.is_contiguous() and q.stride(2) == 1 and q.stride(1) == d
    assert k_cache.dtype == v_cache.dtype == out.dtype == q.dtype
    kernel("decode_attention", q.dtype)(
        out.data_ptr(),
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        b,
        block_tables.shape[1],
        heads,
        k_cache.shape[2],
        d,
        k_cache.shape[1],
        d**-0.5,
        torch.get_num_threads(),
    )


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, kv_heads, d] (heads and elements contiguous, rows equally apart: views into the
    QKV output) into caches [blocks, block_size, kv_heads, d] at the flat slots [T] (int64, each
    below blocks * block_size: the block manager's)."""
    t, kv_heads, d = k.shape
    assert k.stride()[1:] == v.stride()[1:] == (d, 1) and k.stride(0) == v.stride(0)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.is_contiguous()
    assert k_cache.dtype == v_cache.dtype == k.dtype == v.dtype
    kernel("write_kv", k.dtype)(
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0),
        slot_mapping.data_ptr(),
        t,
        kv_heads * d,
    )


def rotary_(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """In place on x [T, heads, d] whose heads and elements are contiguous (a view into the fused
    QKV output is fine); cos/sin: [max_positions, d]."""
    t, heads, d = x.shape
    assert x.stride(2) == 1 and x.stride(1) == d and cos.dtype == sin.dtype == x.dtype
    kernel("rotary", x.dtype)(
        x.data_ptr(),
        x.stride(0),
        t,
        heads,
        d,
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        torch.get_num_threads(),
    )
    return x


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x, residual: contiguous [T, hidden]. With a residual: residual += x in place and x is
    overwritten by the norm of the sum (returned); without: a new tensor."""
    t, hidden = x.shape
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    assert weight.dtype == x.dtype
    out = x if residual is not None else torch.empty_like(x)
    kernel("add_rms_norm", x.dtype)(
        out.data_ptr(),
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        t,
        hidden,
        eps,
        torch.get_num_threads(),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: contiguous [T, 2 n] -> silu(x[:, :n]) * x[:, n:], [T, n]."""
    t, n = x.shape[0], x.shape[1] // 2
    assert x.is_contiguous()
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    kernel("silu_and_mul", x.dtype)(out.data_ptr(), x.data_ptr(), t, n, torch.get_num_threads())
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x: contiguous [B, n] -> [B] int64, as x.max(-1).indices (the first of ties; NaN wins)."""
    assert x.is_contiguous() and x.dim() == 2
    out = torch.empty(x.shape[0], dtype=torch.long)
    kernel("argmax", x.dtype)(out.data_ptr(), x.data_ptr(), *x.shape, torch.get_num_threads())
    return out


def linear(
    x: torch.Tensor, weight: BlockQuantized | Panel | W4A8, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., in] times a prepared weight (plus bias): [..., out], in x's dtype (fp32, or bf16
    for a bf16 panel or w4a8)."""
    rows = x.reshape(-1, weight.in_features).contiguous()
    y = torch.empty(rows.shape[0], weight.out_features, dtype=x.dtype, device=x.device)
    assert bias is None or (bias.is_contiguous() and bias.dtype == x.dtype)
    lib, bias_ptr = _library(), None if bias is None else bias.data_ptr()
    m, k, n = rows.shape[0], weight.in_features, weight.out_features
    tail: tuple = ()  # the bf16 panel's blocks, after the threads
    if isinstance(weight, W4A8):  # fp32 or bf16 x
        fn = lib.w4a8_linear_f32 if x.dtype == torch.float32 else lib.w4a8_linear_bf16
        w, extra = weight.blocks.data_ptr(), (weight.bits,)
    elif isinstance(weight, BlockQuantized):  # the same arguments, fp32 x only
        assert x.dtype == torch.float32
        fn, w, extra = lib.block_quant_linear_f32, weight.blocks.data_ptr(), (weight.bits,)
    else:
        assert x.dtype == weight.data.dtype
        fn = lib.panel_linear_f32 if x.dtype == torch.float32 else lib.panel_linear_bf16
        w, extra, blocks = weight.data.data_ptr(), (), weight.blocks
        if x.dtype == torch.bfloat16:
            tail = (None, 0) if blocks is None else (blocks.blocks.data_ptr(), blocks.bits)
    fn(y.data_ptr(), rows.data_ptr(), m, k, w, n, *extra, bias_ptr, torch.get_num_threads(), *tail)
    return y.view(*x.shape[:-1], n)
