"""Megatron-style tensor-parallel linear layers. Each knows its rank's slice at construction and
carries a `weight_loader` that cuts that slice out of a full checkpoint tensor.

ColumnParallelLinear (output split):     RowParallelLinear (input split, all-reduce after):
        X                                   [X_0 | X_1]   (already split by the column layer)
        |                                     |     |
   [W_0 | W_1] -> [Y_0 | Y_1]               W_0   W_1  -> Y_0 + Y_1 = Y
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel.distributed import TPGroup
from model_parallel.layers import cpu_kernels
from model_parallel.layers.block_quant import BlockQuantized, block_quantize
from model_parallel.layers.panel import Panel, to_panel
from model_parallel.layers.w4a8 import W4A8, to_w4a8

Packed = BlockQuantized | Panel | W4A8


def pack_weight(
    weight: torch.Tensor, quantization: str = "none", blocks: BlockQuantized | None = None
) -> Packed | None:
    """A CPU weight prepared once for our C kernels, whose rows do not depend on the batch (oneDNN's
    do not keep that on every CPU: its packed fp32 and bf16 weights gave other bits for a row
    alone than among 64 on a Zen 4). First an fp32 weight that is exactly a GGUF block
    quantization, kept as such (a decode step's linears at 32 rows: 56-66 ms instead of oneDNN's
    106-108, 7.4 instead of 35 at one row, on a 2-core AVX2 CPU); else the dense panel form. None
    where the kernels do not run (CUDA, no compiler, float16, odd shapes): F.linear then. With
    `w4a8`, only the GGUF's blocks, in the 8-bit-activation kernel's form (w4a8.py): the runner
    packs the rest once they are in the run's dtype. blocks: a bf16 weight's fp32 original's, for
    its panel to read at a few rows."""
    if not cpu_kernels.linear_enabled(weight.device, weight.dtype):
        return None
    if quantization == "w4a8":
        return to_w4a8(weight)
    return block_quantize(weight) or to_panel(weight, blocks)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: Packed | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if packed is None:
        return F.linear(x, weight, bias)
    return cpu_kernels.linear(x, packed, bias)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.packed: Packed | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.bias)

    def pack(
        self, quantization: str = "none", blocks: BlockQuantized | None = None
    ) -> Packed | None:
        """Called once the weights are loaded. The plain weight is dropped once a packed form
        replaces it (420 MB of the default model's fp32 linears)."""
        self.packed = pack_weight(self.weight, quantization, blocks)
        if self.packed is not None:
            self.weight.data = self.weight.data.new_empty(0)
        return self.packed

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        param.data.copy_(loaded)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(in_features, tp.shard(out_features, "output features"), bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers of equal input fused into one matmul (gate_proj and up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup):
        self.out_sizes = [tp.shard(s, "output features") for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        assert isinstance(shard_id, int)
        size = self.out_sizes[shard_id]
        offset = sum(self.out_sizes[:shard_id])
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused, split by heads. When there are fewer KV heads than ranks, each
    KV head is replicated so that every rank holds the one its query heads read."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPGroup
    ):
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = tp.shard(num_kv_heads, "num_key_value_heads")
        elif tp.size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp.size} is neither a divisor nor a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        else:
            self.num_kv_heads = 1
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, tp)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp.rank
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, rank = self.kv_size, self.tp.rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(tp.shard(in_features, "input features"), out_features, bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if param.dim() == 2:
            size = param.shape[1]
            loaded = loaded.narrow(1, self.tp.rank * size, size)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the bias is added once, after the reduction, not on every rank.
        y = self.tp.all_reduce(linear(x, self.weight, self.packed))
        return y + self.bias if self.bias is not None else y
