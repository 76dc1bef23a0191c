"""Tensor-parallel ranks > 0 as Ray actors, placed with rank 0 in one STRICT_PACK placement group.

Rank 0 starts them, hands them the rendezvous address, and from then on drives them only through
torch.distributed broadcasts (no Ray call per step). Ray is used only to place, watch and stop them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from model_parallel.config import EngineConfig, LlamaArchConfig, resolve_dtype
from model_parallel.distributed import init_tp_group
from model_parallel.layers import cpu_kernels
from model_parallel.loader import resolve_model_path
from model_parallel.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def build_runner(config: EngineConfig, rank: int, address: str, store: Any = None) -> ModelRunner:
    """One rank's ModelRunner: the same on rank 0 and on the workers."""
    par = config.parallel
    device = par.torch_device()
    path = resolve_model_path(config.model.model, config.model.cache_dir)
    arch = LlamaArchConfig.from_checkpoint(path)
    limit = arch.max_position_embeddings
    max_model_len = min(config.model.max_model_len or limit, limit)
    tp = init_tp_group(
        rank, par.tensor_parallel_size, address, device, par.collective_timeout_s, store
    )
    return ModelRunner(
        config,
        arch,
        str(path),
        max_model_len,
        resolve_dtype(
            config.model, device, device.type == "cpu" and cpu_kernels.isa() in ("amx", "avx512")
        ),
        device,
        tp,
    )


class TPWorker:
    """A rank > 0: its model and KV shards, running the steps rank 0 broadcasts."""

    def __init__(self, config: EngineConfig, rank: int, address: str):
        logging.basicConfig(level=logging.INFO)
        self.runner = build_runner(config, rank, address)

    def run(self) -> None:
        self.runner.serve_steps()


class WorkerPool:
    """The Ray side of ranks 1..N-1: placement, a liveness check, shutdown."""

    def __init__(self, config: EngineConfig, address: str):
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        size = config.parallel.tensor_parallel_size
        gpu = config.parallel.torch_device().type == "cuda"
        resource = {"GPU": 1} if gpu else {"CPU": 1}
        if not ray.is_initialized():  # a local instance; CPU ranks may share cores
            ray.init(
                address="local",
                log_to_driver=False,
                num_cpus=None if gpu else max(os.cpu_count() or 1, size),
            )
        self.own_pg = get_current_placement_group() is None
        # Inside a Serve replica the deployment's placement group already holds rank 0 in bundle 0.
        self.pg = (
            placement_group([resource] * size, strategy="STRICT_PACK")
            if self.own_pg
            else get_current_placement_group()
        )
        try:
            ray.get(self.pg.ready(), timeout=120)
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(
                f"could not place {size} x {resource} in one node within 120 s "
                f"(cluster has {ray.cluster_resources()})"
            ) from e
        actor = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0)(TPWorker)
        self.actors = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=rank
                )
            ).remote(config, rank, address)
            for rank in range(1, size)
        ]
        self.loops: list[Any] = []

    def start(self) -> None:
        """After every rank has built its runner: the workers enter their step loops."""
        self.loops = [a.run.remote() for a in self.actors]

    def check(self) -> None:
        """Raise if a worker has exited (died, or its loop failed)."""
        import ray

        done, _ = ray.wait(self.loops, num_returns=1, timeout=0)
        if done:
            ray.get(done[0])  # raises the worker's error
            raise RuntimeError("a tensor-parallel worker stopped")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        if self.own_pg:
            remove_placement_group(self.pg)
