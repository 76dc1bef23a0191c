"""The CPU kernels of cpu_kernels.c and block_quant.c: built with the system C compiler on first
use (under a second), cached per source, compiler and CPU, and called through ctypes. Without a
compiler, or with LLMCLUSTER_CPU_KERNELS=0, the layers keep their torch paths and oneDNN's
matmuls, which CUDA always uses.

They pay at decode's small batches, where a step is a few hundred torch ops on small tensors plus
attention that gathers every sequence's KV blocks into a padded copy first."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from model_parallel.layers.block_quant import BlockQuantized
from model_parallel.loader import default_cache_dir

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_suffix(".c"), Path(__file__).with_name("block_quant.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "decode_attention": [_P, _P, ctypes.c_int64] + [_P] * 4 + [_I] * 6 + [_F, _I],
    "rotary": [_P, ctypes.c_int64, _I, _I, _I, _P, _P, _P, _I],
    "add_rms_norm": [_P] * 4 + [_I, _I, _F, _I],
}


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([*(s.read_text() for s in SOURCES), " ".join(FLAGS), version, _cpu_id()]).encode()
    ).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place: ranks and replicas that start together may all build.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(out, target)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LLMCLUSTER_CPU_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU decode runs on the slower torch paths")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))  # torch is loaded: it shares torch's libgomp
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernels unavailable (%s): using the torch paths", detail)
        return None
    for name, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").argtypes = argtypes
    if hasattr(lib, "block_quant_linear_f32"):  # built only where the CPU has AVX2 and FMA
        lib.block_quant_linear_f32.argtypes = [_P, _P, _I, _I, _P, _I, _I, _P, _I]
    return lib


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _SUFFIX and _library() is not None


def block_quant_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        dtype == torch.float32
        and enabled(device, dtype)
        and hasattr(_library(), "block_quant_linear_f32")
    )


def _kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
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
    _kernel("decode_attention", q.dtype)(
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


def rotary_(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """In place on x [T, heads, d] whose heads and elements are contiguous (a view into the fused
    QKV output is fine); cos/sin: [max_positions, d]."""
    t, heads, d = x.shape
    assert x.stride(2) == 1 and x.stride(1) == d and cos.dtype == sin.dtype == x.dtype
    _kernel("rotary", x.dtype)(
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
    _kernel("add_rms_norm", x.dtype)(
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


def block_quant_linear(
    x: torch.Tensor, weight: BlockQuantized, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., in] fp32 times the block-quantized weight (plus bias): [..., out]."""
    rows = x.reshape(-1, weight.in_features).contiguous()
    y = torch.empty(rows.shape[0], weight.out_features, dtype=x.dtype, device=x.device)
    assert bias is None or (bias.is_contiguous() and bias.dtype == x.dtype)
    _library().block_quant_linear_f32(
        y.data_ptr(),
        rows.data_ptr(),
        rows.shape[0],
        weight.in_features,
        weight.blocks.data_ptr(),
        weight.out_features,
        weight.bits,
        None if bias is None else bias.data_ptr(),
        torch.get_num_threads(),
    )
    return y.view(*x.shape[:-1], weight.out_features)
