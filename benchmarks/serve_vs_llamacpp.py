"""Serving benchmark: `llmcluster serve` and, where its path is given, llama.cpp's `llama-server`
on the same GGUF, each driven by `llmcluster bench` (streamed chat, `ignore_eos`, a client on the
same machine) at the same concurrencies in one run. Build llama-server from the llama-cpp-python
sdist (it vendors llama.cpp: `cmake -B build -DGGML_NATIVE=ON && cmake --build build --target
llama-server`); without `--llama-server` only ours runs."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cluster import bench
from cluster.launch import free_port
from model_parallel.loader import builtin_gguf


@contextlib.contextmanager
def running(
    cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """The server of `cmd` (in `env`, else ours), up and healthy, as its /v1 URL; stopped after."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[0]} did not come up: see {log}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


def drive(url: str, concurrency: int, num_prompts: int, max_tokens: int) -> dict:
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    args = ap.parse_args(
        ["--base-url", url, "--concurrency", str(concurrency), "--num-prompts", str(num_prompts)]
        + ["--max-tokens", str(max_tokens), "--no-progress"]
    )
    return bench.asyncio.run(bench.run(args))


def add_serve_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags every serving benchmark takes."""
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--serve-args", default="", help="more `llmcluster serve` flags")
    ap.add_argument("--logs", type=Path, default=Path("bench-results"))


def prompts_for(concurrency: int, num_prompts: int) -> int:
    """Enough requests to keep `concurrency` streams busy, at most 8 rounds of them."""
    return max(concurrency, min(num_prompts, 8 * concurrency))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", type=Path, help="path of a llama-server binary")
    ap.add_argument("--gguf", type=Path, help="default: the built-in model's GGUF")
    add_serve_arguments(ap)
    args = ap.parse_args()
    args.logs.mkdir(exist_ok=True)
    gguf = args.gguf or builtin_gguf()
    slots = max(args.concurrency)
    servers = {
        "llmcluster": lambda port: (
            [sys.executable, "-m", "cluster.cli", "serve", "--port"]
            + [
                str(port),
                *(["--model", str(args.gguf)] if args.gguf else []),
                *args.serve_args.split(),
            ]
        )
    }
    if args.llama_server:
        servers["llama-server"] = lambda port: (
            [str(args.llama_server), "-m", str(gguf)]
            + ["-t", "2", "--port", str(port), "-np", str(slots), "-c", str(slots * 512)]
        )
    print(f"{'server':<13} {'conc':>4} {'tok/s':>8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    for name, command in servers.items():
        port = free_port()
        with running(command(port), port, args.logs / f"{name}.log") as url:
            drive(url, 1, 2, 16)  # warm-up
            for c in args.concurrency:
                r = drive(url, c, prompts_for(c, args.num_prompts), args.max_tokens)
                assert r["failed"] == 0, r["errors"]
                print(
                    f"{name:<13} {c:>4} {r['output_token_throughput']:>8.1f} "
                    f"{r['ttft']['p50_ms']:>12.1f} {r['tpot']['p50_ms']:>12.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
