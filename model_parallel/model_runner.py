"""One rank's model and KV-cache shards: scheduled batch -> flat tensors -> forward -> logits.

The flat batch puts single-token decodes first (attended in one batched call) and prefill chunks
after them; only rows that reach their last known token are turned into logits.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from model_parallel.config import (
    EngineConfig,
    LlamaArchConfig,
    blocks_for_budget,
    kv_bytes_per_token,
)
from model_parallel.distributed import TPGroup
from model_parallel.forward_context import (
    AttentionMetadata,
    ForwardContext,
    PrefillChunk,
    decode_mask,
    kernel_rows,
)
from model_parallel.layers import cpu_kernels
from model_parallel.layers.block_quant import block_quantize
from model_parallel.layers.w4a8 import W4A8
from model_parallel.loader import holds_fp32, load_weights
from model_parallel.models.cpu_forward import CpuForward
from model_parallel.models.llama import LlamaForCausalLM
from model_parallel.scheduler import ScheduledSequence
from model_parallel.step_inputs import CMD_STOP, HEADER_SIZE, StepInputs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        arch: LlamaArchConfig,
        path: str,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: TPGroup,
    ):
        self.arch, self.dtype, self.device, self.tp = arch, dtype, device, tp
        self.max_model_len = max_model_len
        self.block_size = config.cache.block_size
        self.ctx = ForwardContext()
        quantization = config.model.quantization
        # w4a8 and bf16 panels find the GGUF's blocks in the fp32 the checkpoint holds, before
        # any cast rounds them
        self.panel_blocks = (
            dtype == torch.bfloat16
            and cpu_kernels.bf16_blocks_enabled(device)
            and holds_fp32(Path(path))
        )
        with torch.device(device):
            prev = torch.get_default_dtype()
            fp32_first = quantization == "w4a8" or self.panel_blocks
            torch.set_default_dtype(torch.float32 if fp32_first else dtype)
            try:
                self.model = LlamaForCausalLM(arch, max_model_len, tp, self.ctx)
            finally:
                torch.set_default_dtype(prev)
        load_weights(self.model, Path(path))
        self.model.eval()
        self._pack(quantization)
        # Every rank sizes its own pool; all use the smallest, since the block tables are shared.
        local = torch.tensor([self._num_blocks(config)], device=device)
        self.num_blocks = int(tp.all_reduce(local, op=torch.distributed.ReduceOp.MIN).item())
        attn0 = self.model.layers[0].self_attn
        # NOTE: one KV tensor per rank: [2, layers, blocks, block_size, kv_heads_per_rank, head_dim]
        self.kv_cache = torch.zeros(
            2,
            arch.num_layers,
            self.num_blocks,
            self.block_size,
            attn0.num_kv_heads,
            arch.head_dim,
            dtype=dtype,
            device=device,
        )
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.attn.v_cache = self.kv_cache[1, i]
        self.cpu_forward = CpuForward.build(self.model, tp, self.block_size)
        logger.info(
            "rank %d: KV cache of %d blocks x %d tokens = %d tokens; CPU kernels %s",
            tp.rank,
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            # built here if need be, not in the first request's step
            "on" if cpu_kernels.enabled(device, dtype) else "off",
        )

    def _pack(self, quantization: str) -> None:
        """Weights into their kernels' layouts, once; a quantization that fits none of them is an
        error, not a silent no-op."""
        if quantization == "w4a8" and self.device.type != "cpu":  # its dtype: ModelConfig's check
            raise ValueError("--quantization w4a8 runs on CPU")
        modules = [m for m in self.model.modules() if hasattr(m, "pack")]
        if quantization == "w4a8":
            quantized = [isinstance(m.pack("w4a8"), W4A8) for m in modules]
            if not any(quantized):
                raise ValueError(
                    "--quantization w4a8 needs 4-bit (Q4_1) GGUF weights and the CPU kernels "
                    "(AVX2); this model has none that qualify"
                )
            # the rest (norms, embedding, other linears) in the run's dtype, then packed as such
            modules = [m for m, q in zip(modules, quantized) if not q]
        # the blocks of what is left, then its bf16 panels read them at a few rows
        blocks = [block_quantize(m.weight) if self.panel_blocks else None for m in modules]
        self.model.to(self.dtype)
        for m, b in zip(modules, blocks):
            m.pack(blocks=b)

    def _num_blocks(self, config: EngineConfig) -> int:
        cache = config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        kv_heads = self.model.layers[0].self_attn.num_kv_heads
        per_token = kv_bytes_per_token(self.arch, kv_heads, self.dtype)
        if cache.kv_cache_memory_gib is not None:  # an explicit budget wins on every device
            budget = cache.kv_cache_memory_gib * 2**30
        elif self.device.type == "cuda":
            gc.collect()  # a dropped engine's cache is still held by this process's allocator
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * cache.gpu_memory_utilization - (total - free)
        else:
            budget = 2.0 * 2**30
        if budget <= 0:
            raise RuntimeError(
                f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB after the "
                "weights and what else holds the device): raise --gpu-memory-utilization "
                "or set --kv-cache-memory-gib"
            )
        return blocks_for_budget(budget, self.block_size, per_token)

    def metadata(self, inputs: StepInputs) -> AttentionMetadata:
        """Every rank: the attention metadata (masks, per-chunk tables) from the step's tensors."""
        md = AttentionMetadata(inputs.slot_mapping, inputs.num_decodes)
        kernels = cpu_kernels.enabled(self.device, self.dtype)  # no masks: they read the blocks
        if inputs.num_decodes:
            positions = inputs.positions[: inputs.num_decodes]
            md.decode_block_tables = inputs.decode_tables
            md.decode_context_lens = positions + 1
            if not kernels:
                width = inputs.decode_tables.shape[1] * self.block_size
                md.decode_mask = decode_mask(positions, width, self.dtype)
        offset = 0
        for start, n, ctx, num_blocks in inputs.prefills.tolist():
            table = inputs.prefill_tables[offset : offset + num_blocks]
            offset += num_blocks
            mask = None
            if ctx > n and not kernels:  # earlier context in the cache: causal with an offset
                q_pos = torch.arange(ctx - n, ctx, device=self.device)
                mask = torch.arange(ctx, device=self.device)[None, :] <= q_pos[:, None]
            md.prefills.append(PrefillChunk(start, n, ctx, table, mask))
        if kernels:
            md.kernel_rows = kernel_rows(md, self.device)
        return md

    def execute(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """Rank 0: build the step, hand it to the other ranks, and run it -> logits [B, V]."""
        inputs = StepInputs.build(scheduled, self.block_size, self.device)
        if self.tp.size > 1:
            header, payload = inputs.pack()
            self.tp.broadcast(header)
            self.tp.broadcast(payload)
        return self.forward(inputs)

    def serve_steps(self) -> None:
        """Ranks > 0: run the steps rank 0 broadcasts until it says stop."""
        header = torch.empty(HEADER_SIZE, dtype=torch.long, device=self.device)
        while True:
            values = self.tp.broadcast(header).tolist()
            if values[0] == CMD_STOP:
                return
            payload = torch.empty(
                StepInputs.payload_size(values), dtype=torch.long, device=self.device
            )
            self.forward(StepInputs.unpack(values, self.tp.broadcast(payload)))

    def stop_workers(self) -> None:
        if self.tp.size > 1:
            header = torch.zeros(HEADER_SIZE, dtype=torch.long, device=self.device)
            header[0] = CMD_STOP
            self.tp.broadcast(header)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Every rank: the step's forward pass -> logits [B, V] for the sampled rows."""
        md = self.metadata(inputs)
        if self.cpu_forward is not None:
            hidden = self.cpu_forward(inputs.input_ids, inputs.positions, md)
        else:
            with self.ctx.bind(md):
                hidden = self.model(inputs.input_ids, inputs.positions)
        return self.model.compute_logits(hidden[inputs.sample_rows])
