"""Grammar-constrained decoding against free decoding in the engine at one concurrency, and the
compile time of the grammars the tests use.

    .venv/bin/python benchmarks/structured_throughput.py --concurrency 32 --json out.json

Rows: all free; all constrained by a JSON schema long enough to fill max_tokens (so both decode
the same number of tokens in the same batch shape); half and half (the free rows' time per output
token against the all-free run); a realistic schema that ends on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine_throughput import chat_prompts

from model_parallel.config import CacheConfig, EngineConfig, ModelConfig
from model_parallel.engine import LLMEngine
from model_parallel.loader import DEFAULT_MODEL
from model_parallel.request import SamplingParams
from model_parallel.structured import StructuredOutputSpec, build_grammar
from serving.protocol import ChatCompletionRequest
from serving.tool_calls import plan_tools

LONG_LIST = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "minItems": 64,
        }
    },
    "required": ["items"],
}
PROFILE = json.loads(
    (Path(__file__).parents[1] / "tests" / "e2e" / "profile.schema.json").read_text()
)  # the e2e tests' schema
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}


def run(engine: LLMEngine, jobs: list[tuple[list[int], SamplingParams]]) -> dict[str, object]:
    """All jobs at once; per job: output tokens and time per output token after the first."""
    first: dict[str, float] = {}
    end: dict[str, float] = {}
    tokens: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, (prompt, params) in enumerate(jobs):
        engine.add_request(f"j{i}", prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            tokens[out.request_id] = out.num_output_tokens
            if out.finished:
                end[out.request_id] = now
    seconds = time.perf_counter() - t0
    tpot = [(end[r] - first[r]) / max(tokens[r] - 1, 1) for r in first]
    return {"seconds": seconds, "tokens": tokens, "tpot": tpot}


def summary(name: str, res: dict, rows: list[int] | None = None) -> dict[str, float]:
    keys = [f"j{i}" for i in rows] if rows is not None else list(res["tokens"])
    tpot = [res["tpot"][int(k[1:])] for k in keys]
    total = sum(res["tokens"].values())
    return {
        "run": name,
        "output_tokens": total,
        "tokens_per_s": total / res["seconds"],
        "tpot_ms_p50": 1e3 * statistics.median(tpot),
    }


def compile_times(engine: LLMEngine) -> dict[str, float]:
    """Cold compile (parse + token mask tables, no cache) of each spec the tests use, in ms; the
    tokenizer scan, once per engine, is not counted."""
    tools = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    specs = {
        "json_object": StructuredOutputSpec("json_object"),
        "json_schema PROFILE": StructuredOutputSpec("json_schema", json.dumps(PROFILE)),
        "json_schema LONG_LIST": StructuredOutputSpec("json_schema", json.dumps(LONG_LIST)),
        "regex": StructuredOutputSpec("regex", "[A-Z]{3}-[0-9]{2}"),
        "choice": StructuredOutputSpec("choice", '["red", "green"]'),
    }
    for choice in ("auto", "required"):
        req = tools.model_copy(update={"tools": [WEATHER], "tool_choice": choice})
        specs[f"tools {choice}"] = plan_tools(req).guide()
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(
        engine.tokenizer, vocab_size=engine.arch.vocab_size, stop_token_ids=engine.eos_token_ids
    )
    times = {}
    for name, spec in specs.items():
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        t0 = time.perf_counter()
        compiler.compile_grammar(build_grammar(spec))
        times[name] = 1e3 * (time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=ModelConfig(args.model, args.dtype), cache=CacheConfig()))
    n = args.concurrency
    prompts = chat_prompts(engine.tokenizer, n)
    ask = [
        list(
            engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"List {64 + i} short facts about cities as JSON."}],
                add_generation_prompt=True,
                tokenize=True,
            )["input_ids"]
        )
        for i in range(n)
    ]

    def params(schema: dict | None, **kw: object) -> SamplingParams:
        spec = StructuredOutputSpec("json_schema", json.dumps(schema)) if schema else None
        kw = {"temperature": 0.0, "max_tokens": args.max_tokens, **kw}
        return SamplingParams(structured=spec, **kw)  # type: ignore[arg-type]

    free = [(p, params(None, ignore_eos=True)) for p in prompts]
    run(engine, free[:4])  # warm-up, and the grammar compiler's tokenizer scan
    run(engine, [(ask[0], params(LONG_LIST, max_tokens=8))])
    long = [(ask[i], params(LONG_LIST)) for i in range(n)]
    half = [long[i] if i % 2 else free[i] for i in range(n)]
    profile = [(ask[i], params(PROFILE, temperature=0.8, seed=i)) for i in range(n)]
    runs: list[tuple[str, list, list[int] | None]] = [
        ("free", free, None),
        ("json_schema (fills max_tokens)", long, None),
        ("half constrained: the free rows", half, list(range(0, n, 2))),
        ("json_schema PROFILE (ends itself)", profile, None),
    ]
    # Interleaved repeats, median of each: this shared 2-core machine drifts by 10-20%.
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    for _ in range(args.repeats):
        for name, jobs, rows in runs:
            samples[name].append(summary(name, run(engine, jobs), rows))
    results = [sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] for rs in samples.values()]
    base = results[0]
    print(f"{'run':<36} {'tokens':>7} {'tok/s':>8} {'TPOT p50 ms':>12} {'vs free':>8}")
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['run']:<36} {r['output_tokens']:>7} {r['tokens_per_s']:>8.1f} "
            f"{r['tpot_ms_p50']:>12.1f} {ratio:>7.2f}x"
        )
    times = compile_times(engine)
    for name, ms in times.items():
        print(f"compile {name:<24} {ms:8.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "compile_ms": times}, f, indent=2)


if __name__ == "__main__":
    main()
