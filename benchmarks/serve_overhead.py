"""What the Serve path costs over the engine alone: the engine benchmark's loop in this process,
then `llmcluster serve` in each Serve mode asked for (its environment variables), each driven by
`llmcluster bench` at the same concurrencies, with the CPU-seconds every Ray process spent per
1,000 streamed tokens, by process.

    .venv/bin/python benchmarks/serve_overhead.py --modes default python-proxy --concurrency 1 32
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_throughput import chat_prompts, run_engine  # noqa: E402
from serve_vs_llamacpp import (  # noqa: E402
    add_serve_arguments,
    drive,
    free_port,
    prompts_for,
    running,
)

from model_parallel.config import QUANTIZATIONS  # noqa: E402

_NO_HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
_THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
MODES: dict[str, tuple[dict[str, str], list[str]]] = {  # environment, `llmcluster serve` flags
    "default": ({}, []),  # what `llmcluster serve` sets (cluster.launch.SERVE_ENV): HAProxy
    "ingress": ({}, ["--no-direct-streaming"]),  # the separate ingress deployment
    "python-proxy": (_NO_HAPROXY, []),  # Serve's own proxy, over gRPC
    "no-grpc": (_NO_HAPROXY | {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}, []),
    "throughput": (_THROUGHPUT, []),
    # No proxy at all: the replica's own HTTP server (one ingress replica a node)
    "direct-ingress": (_NO_HAPROXY | {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}, []),
    "omp-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
}
_TICK = os.sysconf("SC_CLK_TCK")


ROLES = ("LLMServer", "OpenAIIngress", "ProxyActor", "HAProxyManager", "ServeController")


def role(argv: list[str]) -> str | None:
    """Which part of the Serve path a process is (a Ray worker's title changes as it runs)."""
    if "cluster.cli" in argv:
        return "serve driver"
    title = argv[0]
    if title.startswith("ray::"):
        return next((r for r in ROLES if r in title), title.split()[0].split(".")[0])
    name = Path(title).name
    return name if name in ("raylet", "gcs_server", "haproxy") else None


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Each Serve process's role and its CPU-seconds so far, and this process's (the client's).
    The engine's own process (see model_parallel.async_engine.ProcessEngine) is the one an
    LLMServer replica started."""
    found, parents = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in cmd if a]
        seconds = (int(stat[11]) + int(stat[12])) / _TICK  # utime + stime
        parents[int(pid)] = (int(stat[1]), seconds)
        name = role(argv) if argv else None
        if name is not None:
            found[int(pid)] = (name, seconds)
    for pid, (ppid, seconds) in parents.items():
        if found.get(ppid, ("",))[0] == "LLMServer" and pid not in found:
            found[pid] = ("engine process", seconds)
    found[os.getpid()] = ("bench client", parents[os.getpid()][1])  # on the same cores
    return found


def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict:
    by: dict[str, float] = defaultdict(float)
    for pid, (name, seconds) in after.items():
        by[name] += seconds - before.get(pid, (name, 0.0))[1]
    return by


def engine_alone(
    concurrency: list[int], num_prompts: int, max_tokens: int, quantization: str
) -> dict[int, dict]:
    from model_parallel.config import EngineConfig, ModelConfig
    from model_parallel.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=ModelConfig(quantization=quantization)))
    # as many as the Serve runs send: fewer prompts than streams would run fewer streams
    prompts = chat_prompts(engine.tokenizer, max(prompts_for(c, num_prompts) for c in concurrency))
    run_engine(engine, prompts[:4], 4, 8)  # warm-up
    out = {}
    for c in concurrency:
        r = run_engine(engine, prompts[: prompts_for(c, num_prompts)], c, max_tokens)
        out[c] = {"tok/s": r.tokens_per_s, "ttft": r.ttft_ms_p50, "tpot": r.tpot_ms_p50}
        row("engine", c, out[c], None)
    engine.shutdown()
    del engine
    gc.collect()
    return out


def row(name: str, c: int, r: dict, engine: dict | None) -> None:
    ratio = f"{r['tok/s'] / engine['tok/s']:5.2f}x" if engine else ""
    print(
        f"{name:<20} {c:>4} {r['tok/s']:>8.1f} {r['ttft']:>12.1f} {r['tpot']:>12.1f} {ratio:>7}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["default", "python-proxy"], choices=MODES)
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="both sides'")
    add_serve_arguments(ap)
    args = ap.parse_args()
    args.logs.mkdir(exist_ok=True)
    print(f"{'system':<20} {'conc':>4} {'tok/s':>8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    engine = engine_alone(args.concurrency, args.num_prompts, args.max_tokens, args.quantization)
    costs = {}
    for mode in args.modes:
        env, flags = MODES[mode]
        env = {**os.environ, **env}
        port = free_port()
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), *flags]
        cmd += ["--quantization", args.quantization]
        with running(cmd + args.serve_args.split(), port, args.logs / f"{mode}.log", env) as url:
            drive(url, 1, 2, 16)  # warm-up
            for c in args.concurrency:
                before = cpu_by_process()
                r = drive(url, c, prompts_for(c, args.num_prompts), args.max_tokens)
                after = cpu_by_process()
                assert r["failed"] == 0, r["errors"]
                tokens = prompts_for(c, args.num_prompts) * args.max_tokens
                costs[mode, c] = {k: 1e3 * v / tokens for k, v in spent(before, after).items()}
                got = {
                    "tok/s": r["output_token_throughput"],
                    "ttft": r["ttft"]["p50_ms"],
                    "tpot": r["tpot"]["p50_ms"],
                }
                row(mode, c, got, engine[c])
    print("\nCPU-seconds per 1,000 streamed tokens, by process")
    for (mode, c), by in costs.items():
        top = sorted(((v, k) for k, v in by.items() if v >= 0.005), reverse=True)
        parts = ", ".join(f"{k} {v:.2f}" for v, k in top)
        print(f"{mode} @{c}: total {sum(by.values()):.2f}: {parts}")


if __name__ == "__main__":
    main()
