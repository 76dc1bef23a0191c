"""Sampling defaults for the fields a request leaves out: the model's generation_config.json, then
the operator's overrides; a field the request sets always wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.chat import generation_defaults, sampling_params
from serving.config import ModelDeployment
from serving.protocol import ChatCompletionRequest


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_model_file_then_overrides_then_request(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "eos_token_id": 2})
    )
    defaults = generation_defaults(tmp_path, {"temperature": 0.2})
    assert defaults == {"temperature": 0.2, "top_p": 0.95}
    p = sampling_params(chat(), None, None, defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.2, 0.95, 0)
    p = sampling_params(chat(temperature=0.0, top_p=1.0), None, None, defaults=defaults)
    assert (p.temperature, p.top_p) == (0.0, 1.0)
    p = sampling_params(chat(), None, None, defaults=generation_defaults(tmp_path / "none", None))
    assert (p.temperature, p.top_p) == (1.0, 1.0)  # OpenAI's own defaults


def test_unknown_override_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        ModelDeployment(generation_config={"max_tokens": 5})
