"""What an idle `llmcluster serve` app costs an engine beside it on the same cores: the engine
benchmark's loop in this process, with every process of the app (the driver and all it started:
Ray's, HAProxy, the replica and its engine process) alternately running and frozen (SIGSTOP: no
CPU and no wake-ups), in pairs, since a shared VM's speed drifts more between minutes than this.

    .venv/bin/python benchmarks/idle_serve_cost.py --concurrency 1 --pairs 8
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_throughput import chat_prompts, run_engine  # noqa: E402
from serve_vs_llamacpp import add_serve_arguments, prompts_for, running  # noqa: E402

from cluster.launch import free_port  # noqa: E402


def tree(root: int) -> list[int]:
    """`root` and its descendants now (Ray's processes are the serve driver's)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(pid))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    add_serve_arguments(ap)
    args = ap.parse_args()
    args.logs.mkdir(exist_ok=True)
    from model_parallel.config import EngineConfig
    from model_parallel.engine import LLMEngine

    engine = LLMEngine(EngineConfig())
    port = free_port()
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port)]
    with running(cmd + args.serve_args.split(), port, args.logs / "idle-serve.log"):
        time.sleep(10)  # past the app's start-up work
        driver = next(p for p in tree(os.getpid()) if b"cluster.cli" in cmdline(p))
        for c in args.concurrency:
            prompts = chat_prompts(engine.tokenizer, prompts_for(c, args.num_prompts))
            run_engine(engine, prompts[:4], 4, 8)  # warm-up
            results: dict[str, list[tuple[float, float]]] = {"running": [], "frozen": []}
            pids = tree(driver)
            print(f"{len(pids)} processes of the app", flush=True)
            try:
                for _pair in range(args.pairs):
                    for state, sig in (("running", signal.SIGCONT), ("frozen", signal.SIGSTOP)):
                        signal_all(pids, sig)
                        time.sleep(2)
                        r = run_engine(engine, prompts, c, args.max_tokens)
                        results[state].append((r.tokens_per_s, r.tpot_ms_p50))
                        print(
                            f"{c:>4} {state:<8} {r.tokens_per_s:8.1f} tok/s  TPOT p50 "
                            f"{r.tpot_ms_p50:6.2f} ms",
                            flush=True,
                        )
            finally:
                signal_all(pids, signal.SIGCONT)
            for state, rs in results.items():
                tok_s, tpot = (statistics.median(x) for x in zip(*rs))
                print(f"{c:>4} {state:<8} median {tok_s:8.1f} tok/s  TPOT p50 {tpot:6.2f} ms")
    engine.shutdown()


if __name__ == "__main__":
    main()
