"""`llmcluster bench`: drive any OpenAI-compatible endpoint (like `vllm bench serve`) at a fixed
concurrency or a Poisson request rate, and report latency percentiles and throughput."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

TOPICS = [
    "the ocean",
    "a city at night",
    "learning to cook",
    "the history of bridges",
    "a robot",
    "winter mornings",
    "chess openings",
    "a lighthouse keeper",
]
ASKS = [
    "Write a short story about {}.",
    "Describe {} in detail.",
    "Write a poem about {}.",
    "Explain {} to a child.",
    "List facts about {}.",
    "Give advice related to {}.",
    "Write a dialogue about {}.",
    "Summarize what people love about {}.",
]


def builtin_prompts(n: int) -> list[str]:
    """The built-in chat prompts (the engine benchmark uses the same ones)."""
    return [ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)]) for i in range(n)]


@dataclass
class Sample:
    """One request to send: chat messages, or a prompt of token ids for /v1/completions."""

    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def load_samples(args: argparse.Namespace) -> list[Sample]:
    rng = random.Random(args.seed)
    if args.dataset == "random":
        return [
            Sample(prompt_ids=[rng.randrange(1000, 30000) for _ in range(args.input_len)])
            for _ in range(args.num_prompts)
        ]
    if args.dataset == "builtin":
        texts = builtin_prompts(args.num_prompts)
    else:  # a ShareGPT-style JSON file: [{"conversations": [{"from": "human", "value": ...}]}]
        with open(args.dataset) as f:
            rows = json.load(f)
        texts = [
            turn["value"]
            for row in rows
            for turn in row.get("conversations", [])[:1]
            if turn.get("from") in ("human", "user")
        ]
        if not texts:
            raise SystemExit(f"no human turns in {args.dataset}")
        texts = [texts[i % len(texts)] for i in range(args.num_prompts)]
    return [Sample(messages=[{"role": "user", "content": t}]) for t in texts]


class BenchError(Exception):
    """A request the server refused or a stream that carried an error."""


async def stream_events(session: Any, url: str, body: dict[str, Any]) -> AsyncIterator[dict]:
    """The JSON events of one SSE response, read as raw lines (as vLLM's bench does): the openai
    client's per-chunk parsing cost 0.27 CPU-s per 1,000 tokens at 32 streams on a 2-core Zen 4,
    three times the model replica's own, on the cores the server runs on."""
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise BenchError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise BenchError(str(event["error"])[:200])
            yield event


async def send(
    session: Any, base_url: str, model: str, sample: Sample, max_tokens: int, temperature: float
) -> RequestResult:
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if sample.messages is not None:
        url, body["messages"] = f"{base_url}/chat/completions", sample.messages
    else:
        url, body["prompt"] = f"{base_url}/completions", sample.prompt_ids
    try:
        async for event in stream_events(session, url, body):
            now = time.perf_counter()
            if choices := event.get("choices"):
                text = choices[0].get("delta", {}).get("content") or choices[0].get("text")
                if text:
                    if not result.ttft:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
            if usage := event.get("usage"):
                result.output_tokens = usage["completion_tokens"]
        result.e2e = time.perf_counter() - start
        result.ok = True
    except Exception as e:  # noqa: BLE001 - counted and reported, never fatal to the run
        result.error = repr(e)[:200]
    return result


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {
        "mean_ms": 1e3 * statistics.fmean(v),
        "p50_ms": 1e3 * pick(0.5),
        "p90_ms": 1e3 * pick(0.9),
        "p99_ms": 1e3 * pick(0.99),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    from tqdm import tqdm

    base_url = args.base_url.rstrip("/")
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {args.api_key}"},
        timeout=aiohttp.ClientTimeout(total=args.timeout),
        connector=aiohttp.TCPConnector(limit=0),  # the semaphore below is the limit
    ) as session:
        if args.model:
            model = args.model
        else:
            async with session.get(f"{base_url}/models") as resp:
                if resp.status != 200:
                    raise SystemExit(f"{base_url}/models: HTTP {resp.status}")
                model = (await resp.json())["data"][0]["id"]
        samples = load_samples(args)
        limit = asyncio.Semaphore(args.concurrency or len(samples))
        rng = random.Random(args.seed)
        bar = tqdm(total=len(samples), desc="requests", disable=args.no_progress)

        async def one(sample: Sample) -> RequestResult:
            async with limit:
                r = await send(session, base_url, model, sample, args.max_tokens, args.temperature)
                bar.update()
                return r

        start = time.perf_counter()
        tasks = []
        for sample in samples:
            tasks.append(asyncio.create_task(one(sample)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "model": model,
        "base_url": args.base_url,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": tokens / duration,
        "output_tokens": tokens,
        "ttft": percentiles([r.ttft for r in ok]),
        "tpot": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl": percentiles([x for r in ok for x in r.itl]),
        "e2e": percentiles([r.e2e for r in ok]),
        "results": [asdict(r) | {"itl": None} for r in results] if args.per_request else None,
    }


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["ttft", "tpot", "itl", "e2e"]
    for i, q in enumerate(["p50_ms", "p90_ms", "p99_ms"]):
        lat.bar(
            [x + 0.25 * i for x in range(4)],
            [report[n].get(q, 0) for n in names],
            width=0.25,
            label=q.removesuffix("_ms"),
        )
    lat.set_xticks([x + 0.25 for x in range(4)], names)
    lat.set_yscale("log")
    lat.set_ylabel("ms")
    lat.legend()
    lat.set_title("latency percentiles")
    thr.bar(
        ["output tok/s", "requests/s x100"],
        [report["output_token_throughput"], 100 * report["request_throughput"]],
    )
    thr.set_title(f"throughput ({report['completed']}/{report['num_requests']} ok)")
    fig.tight_layout()
    fig.savefig(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--dataset", default="builtin", help="builtin, random, or a ShareGPT JSON file")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="random dataset: prompt tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="default 0: greedy, as the engine benchmark and vLLM's bench (the API's default, 1, "
        "samples, and llama-server's sampler chain differs from ours)",
    )
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="draw latency percentiles and throughput (PNG)")
    p.add_argument("--per-request", action="store_true", help="include each request in the JSON")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(run(args))
    summary = {k: v for k, v in report.items() if k != "results"}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0 if report["failed"] == 0 else 1
