"""`llmcluster serve` as a user runs it: serves the default model, answers the openai client,
and SIGTERM takes everything down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.launch import wait_healthy
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow


def raylets() -> int:
    out = subprocess.run(["pgrep", "-f", "ray/core/src/ray/raylet/raylet"], capture_output=True)
    return len(out.stdout.split())


def test_serve_answers_and_sigterm_shuts_down_cleanly(tmp_path) -> None:  # noqa: ANN001
    from openai import OpenAI

    before = raylets()
    port = free_port()
    env = {**os.environ, "LLMCLUSTER_API_KEY": "cli-key"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--port",
            str(port),
            "--served-model-name",
            "smol",
        ],
        env=env,
        stdout=open(tmp_path / "out.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 240)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        r = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )
        assert "Paris" in r.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while raylets() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert raylets() == before, (tmp_path / "out.log").read_text()[-3000:]
