"""The `llmcluster chat` command, run as a user runs it."""

from __future__ import annotations

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
