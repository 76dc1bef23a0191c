"""The `llmcluster` command: `serve` (the OpenAI-compatible server on Ray Serve) and `chat` (the
engine in this process)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from model_parallel.config import (
    QUANTIZATIONS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from model_parallel.loader import DEFAULT_MODEL
from model_parallel.request import SamplingParams
from serving.config import AppConfig, ModelDeployment, ServerSettings, config_from_dict

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a local HF checkpoint directory, a .gguf file, or the built-in default",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument(
        "--quantization",
        default="none",
        choices=list(QUANTIZATIONS),
        help="w4a8: a GGUF's 4-bit weights x 8-bit activations on CPU (faster; changes outputs)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--kv-cache-memory-gib",
        type=float,
        default=None,
        help="KV cache budget in GiB (default: 2 on CPU; on CUDA --gpu-memory-utilization)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=CacheConfig().gpu_memory_utilization,
        help="CUDA: the fraction of the device's memory weights + KV cache may take",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            quantization=args.quantization,
        ),
        cache=CacheConfig(
            kv_cache_memory_gib=args.kv_cache_memory_gib,
            gpu_memory_utilization=args.gpu_memory_utilization,
        ),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size),
    )


def _chat(args: argparse.Namespace) -> int:
    from model_parallel.engine import LLMEngine

    if args.tensor_parallel_size != 1:
        print("chat runs one rank; tensor parallelism comes with the TP issue", file=sys.stderr)
        return 2
    engine = LLMEngine(_engine_config(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None
    turns = iter([args.prompt]) if not interactive else iter(lambda: input("you> "), None)
    for turn, text in enumerate(turns):
        history.append({"role": "user", "content": text})
        ids = list(
            engine.tokenizer.apply_chat_template(
                history, add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        engine.add_request(f"chat-{turn}", ids, params)
        reply = []
        while engine.has_unfinished():
            for out in engine.step():
                for c in out.outputs:
                    reply.append(c.text)
                    print(c.text, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    _engine_args(p)
    p.add_argument(
        "--served-model-name", default=None, help="the name clients use (default: --model)"
    )
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--config", default=None, help="a Serve config YAML (configs/*.yaml)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLMCLUSTER_API_KEY"),
        help="require this bearer key (also LLMCLUSTER_API_KEY)",
    )
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--min-replicas", type=int, default=None, help="with --max-replicas: autoscale")
    p.add_argument("--max-replicas", type=int, default=None)
    p.add_argument("--target-ongoing-requests", type=float, default=None)
    p.add_argument(
        "--cpus-per-replica",
        type=int,
        default=None,
        help="CPUs (and matmul threads) per model replica; default on CPU: cores / replicas",
    )
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig().max_num_seqs)
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=SchedulerConfig().max_num_batched_tokens
    )
    p.add_argument("--max-queued-requests", type=int, default=ModelDeployment().max_queued_requests)
    p.add_argument(
        "--stream-interval",
        type=int,
        default=ModelDeployment().stream_interval,
        help="tokens per streamed chunk after the first (more: less CPU, burstier streams)",
    )
    p.add_argument("--address", default=None, help="join a running Ray cluster ('auto')")
    p.add_argument(
        "--no-direct-streaming",
        dest="direct_streaming",
        action="store_false",
        help="keep the ingress apart even for one model on one replica (serving/direct.py)",
    )
    p.add_argument("--allow-request-chat-template", action="store_true")
    p.add_argument(
        "--override-generation-config",
        type=json.loads,
        default=None,
        help="sampling defaults for fields a request omits, e.g. '{\"temperature\": 0.2}'",
    )


def _app_config(args: argparse.Namespace) -> AppConfig:
    engine = _engine_config(args)
    engine = dataclasses.replace(
        engine,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
        ),
    )
    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None:
        lo = args.min_replicas if args.min_replicas is not None else 1
        autoscaling = {"min_replicas": lo, "max_replicas": args.max_replicas or lo}
        if args.target_ongoing_requests is not None:  # else half the engine's batch (serving.app)
            autoscaling["target_ongoing_requests"] = args.target_ongoing_requests
    model = ModelDeployment(
        engine=engine,
        served_model_name=args.served_model_name,
        num_replicas=args.num_replicas,
        autoscaling_config=autoscaling,
        cpus_per_replica=args.cpus_per_replica,
        max_queued_requests=args.max_queued_requests,
        generation_config=args.override_generation_config,
        stream_interval=args.stream_interval,
    )
    server = ServerSettings(
        api_key=args.api_key, allow_request_chat_template=args.allow_request_chat_template
    )
    return AppConfig(models=(model,), server=server, direct_streaming=args.direct_streaming)


def _from_yaml(args: argparse.Namespace) -> tuple[AppConfig, str, int]:
    """The app, host and port of a Serve config file (flags given explicitly win)."""
    import yaml

    with open(args.config) as f:
        doc = yaml.safe_load(f)
    apps = [
        a for a in doc.get("applications", []) if a.get("import_path", "").startswith("serving.")
    ]
    if len(apps) != 1:
        raise ValueError(f"{args.config}: expected one llmcluster application, found {len(apps)}")
    http = doc.get("http_options") or {}
    config = config_from_dict(apps[0].get("args") or {})
    if args.api_key:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, api_key=args.api_key)
        )
    host = args.host if args.host != DEFAULT_HOST else http.get("host", DEFAULT_HOST)
    port = args.port if args.port != DEFAULT_PORT else http.get("port", DEFAULT_PORT)
    return config, host, port


def _serve(args: argparse.Namespace) -> int:
    from cluster.launch import serve_forever

    if args.config:
        config, host, port = _from_yaml(args)
    else:
        config, host, port = _app_config(args), args.host, args.port
    serve_forever(config, host, port, args.address)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmcluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI API on Ray Serve")
    _serve_args(serve)
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible endpoint")
    from cluster.bench import add_arguments

    add_arguments(bench)
    chat = sub.add_parser("chat", help="chat with a model in this process")
    _engine_args(chat)
    chat.add_argument("prompt", nargs="?", help="one-shot prompt; without it, an interactive chat")
    chat.add_argument("--system", default=None)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            from cluster.bench import main as bench_main

            return bench_main(args)
        return _serve(args) if args.command == "serve" else _chat(args)
    except (EOFError, KeyboardInterrupt):
        print()
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
