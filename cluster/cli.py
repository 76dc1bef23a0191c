"""The `llmcluster` command. `chat` talks to the engine in-process (the OpenAI server comes with the
serving issue)."""

from __future__ import annotations

import argparse
import sys

from model_parallel.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from model_parallel.loader import DEFAULT_MODEL
from model_parallel.request import SamplingParams


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a local HF checkpoint directory, a .gguf file, or the built-in default",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-gib", type=float, default=None, help="CPU KV budget (GiB)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len),
        cache=CacheConfig(kv_cache_memory_gib=args.kv_cache_memory_gib),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmcluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model in this process")
    _engine_args(chat)
    chat.add_argument("prompt", nargs="?", help="one-shot prompt; without it, an interactive chat")
    chat.add_argument("--system", default=None)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    try:
        return _chat(args)
    except (EOFError, KeyboardInterrupt):
        print()
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
