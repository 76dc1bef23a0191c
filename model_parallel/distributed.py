"""The one seam for tensor-parallel collectives. Each returns at once for a group of one rank.

A group is a gloo (CPU) or NCCL (CUDA) backend built on a TCPStore whose address rank 0 picks; no
process-global default group, so one process may hold several engines (the tests do).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(slots=True)
class CommStats:
    """Wall time spent waiting in collectives on this rank (the benchmark reports it per step)."""

    seconds: float = 0.0
    calls: int = 0

    def wait(self, work: Any) -> None:
        start = time.perf_counter()
        work.wait()
        self.seconds += time.perf_counter() - start
        self.calls += 1


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    backend: Any = None  # ProcessGroupGloo / ProcessGroupNCCL
    store: Any = None  # kept alive for the group's lifetime
    stats: CommStats = field(default_factory=CommStats)

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            self.stats.wait(self.backend.allreduce([x], opts))
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` (rank order)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.stats.wait(self.backend.allgather([parts], [x]))
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            self.stats.wait(self.backend.broadcast(x, src))
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


def node_address() -> str:
    """This node's IP as other nodes see it (loopback when alone)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray: a single machine
        return "127.0.0.1"


def create_master_store(timeout_s: float) -> tuple[Any, str]:
    """Rank 0's rendezvous store on a free port; returns it and the 'host:port' to hand out."""
    host = node_address()
    store = dist.TCPStore(
        host, 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )
    return store, f"{host}:{store.port}"


def init_tp_group(
    rank: int, size: int, address: str, device: torch.device, timeout_s: float, store: Any = None
) -> TPGroup:
    """Join the group (blocks until every rank has). NCCL on CUDA, gloo on CPU."""
    if size == 1:
        return TPGroup()
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), None, False, timeout)
    if device.type == "cuda":
        backend = dist.ProcessGroupNCCL(store, rank, size)
    else:
        backend = dist.ProcessGroupGloo(store, rank, size, timeout)
    return TPGroup(rank, size, backend, store)
