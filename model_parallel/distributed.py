"""The one seam for tensor-parallel collectives. Each returns at once for a group of one rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # the device group: NCCL on CUDA, gloo on CPU

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def shard(self, total: int, name: str) -> int:
        """This rank's share of `total` units (heads, rows); a clear error if they do not divide."""
        if total % self.size:
            valid = [d for d in range(1, total + 1) if total % d == 0]
            raise ValueError(
                f"{name} ({total}) is not divisible by tensor_parallel_size {self.size}; "
                f"valid sizes: {valid}"
            )
        return total // self.size
