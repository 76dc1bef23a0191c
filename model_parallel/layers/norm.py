"""RMSNorm and SwiGLU, written to match HuggingFace Llama's numerics (the norm in fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel.layers import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With `residual`, adds it first and returns (normed, new residual): fused pre-norm. The
        CPU kernel does that in place: the sum into `residual`, the norm into `x`."""
        if cpu_kernels.enabled(x.device, x.dtype):
            out = cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The CPU kernel where the others run: the whole-stack C forward uses it too, and both paths
    must give the same bits."""
    if cpu_kernels.enabled(x.device, x.dtype) and x.dim() == 2 and x.is_contiguous():
        return cpu_kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
