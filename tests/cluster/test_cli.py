"""The `llmcluster chat` command, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_one_shot_chat_answers() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "chat",
            "--temperature",
            "0",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_missing_model_exits_2_with_the_reason() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "chat", "--model", "/no/such", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "not found" in out.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--gpu-memory-utilization", "1.5", r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
        ("--kv-cache-memory-gib", "0", "kv_cache_memory_gib must be > 0, got 0.0"),
        ("--dtype=float16 --quantization", "w4a8", "w4a8 runs in float32 or bfloat16, not float16"),
    ],
)
def test_bad_engine_settings_exit_2_naming_the_field(flag: str, value: str, message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", *flag.split(), value],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr
