"""Engine throughput and latency at fixed concurrency, against HuggingFace `generate` (static batch
of the same size, the engine's dtype unless --hf-dtype says otherwise) on the same machine in the
same run.

    .venv/bin/python benchmarks/engine_throughput.py --concurrency 1 8 32 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from cluster.bench import builtin_prompts
from model_parallel.config import (
    QUANTIZATIONS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from model_parallel.engine import LLMEngine
from model_parallel.loader import DEFAULT_MODEL
from model_parallel.request import SamplingParams


@dataclass
class Result:
    system: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_ms_p50: float | None = None
    tpot_ms_p50: float | None = None
    collective_ms_per_step: float | None = None  # rank 0's wait in all-reduce/gather/broadcast


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    texts = builtin_prompts(n)
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for t in texts
    ]


def run_engine(
    engine: LLMEngine, prompts: list[list[int]], concurrency: int, max_tokens: int
) -> Result:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    # Each run starts cold: earlier runs sent the same prompts. (Within a run, prompts still
    # share the chat template's cached blocks, as they would in a server.)
    engine.block_manager.reset_prefix_cache()
    queue = list(enumerate(prompts))
    start_t: dict[str, float] = {}
    first_t: dict[str, float] = {}
    end_t: dict[str, float] = {}
    t0 = time.perf_counter()
    in_flight = steps = 0
    comm = engine.runner.tp.stats
    comm_before = comm.seconds
    while queue or engine.has_unfinished():
        steps += 1
        while queue and in_flight < concurrency:
            i, p = queue.pop(0)
            engine.add_request(f"q{i}", p, params)
            start_t[f"q{i}"] = time.perf_counter()
            in_flight += 1
        for out in engine.step():
            now = time.perf_counter()
            first_t.setdefault(out.request_id, now)
            if out.finished:
                end_t[out.request_id] = now
                in_flight -= 1
    seconds = time.perf_counter() - t0
    ttft = [first_t[r] - start_t[r] for r in start_t]
    tpot = [(end_t[r] - first_t[r]) / (max_tokens - 1) for r in start_t]
    total = len(prompts) * max_tokens
    return Result(
        "llmcluster",
        concurrency,
        len(prompts),
        total,
        seconds,
        total / seconds,
        1e3 * statistics.median(ttft),
        1e3 * statistics.median(tpot),
        1e3 * (comm.seconds - comm_before) / steps,
    )


def run_hf(model, tokenizer, prompts: list[list[int]], batch: int, max_tokens: int) -> Result:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # some transformers versions leave it unset for this model
        tokenizer.pad_token = tokenizer.eos_token
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        enc = tokenizer.pad({"input_ids": chunk}, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    total = len(prompts) * max_tokens
    return Result("hf-generate", batch, len(prompts), total, seconds, total / seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=SchedulerConfig().max_num_batched_tokens
    )
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-dtype", help="HF generate's dtype (default: the engine's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, quantization=args.quantization),
        cache=CacheConfig(),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size),
    )
    engine = LLMEngine(config)  # TP > 1 starts a local Ray instance for the workers
    prompts = chat_prompts(engine.tokenizer, args.num_prompts)
    run_engine(engine, prompts[:4], 4, 8)  # warm-up
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf = (
            AutoModelForCausalLM.from_pretrained(
                str(engine.model_path), dtype=args.hf_dtype or engine.runner.dtype
            )
            .to(engine.runner.device)
            .eval()
        )
    results = []
    print(
        f"{'system':<12} {'conc':>4} {'tok/s':>8} "
        f"{'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'vs HF':>6} {'comm ms/step':>12}"
    )
    for c in args.concurrency:
        ours = run_engine(engine, prompts, c, args.max_tokens)
        row = [asdict(ours)]
        ratio = ""
        if hf is not None:
            ref = run_hf(hf, engine.tokenizer, prompts, c, args.max_tokens)
            row.append(asdict(ref))
            ratio = f"{ours.tokens_per_s / ref.tokens_per_s:5.2f}x"
            print(f"{ref.system:<12} {c:>4} {ref.tokens_per_s:>8.1f}")
        print(
            f"{ours.system:<12} {c:>4} {ours.tokens_per_s:>8.1f} {ours.ttft_ms_p50:>12.1f} "
            f"{ours.tpot_ms_p50:>12.1f} {ratio:>6} {ours.collective_ms_per_step:>12.1f}",
            flush=True,
        )
        results.extend(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
