"""Chat messages -> prompt token ids through the model's own (sandboxed) chat template, request
fields -> SamplingParams, and engine outputs -> OpenAI choices, logprobs and usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_parallel.request import CompletionOutput, SamplingParams, TokenLogprobs
from model_parallel.structured import StructuredOutputSpec
from serving.config import GENERATION_DEFAULT_KEYS
from serving.protocol import ChatCompletionRequest, OpenAIError, SamplingFields
from serving.tool_calls import ToolPlan, prompt_messages

# apply_chat_template arguments a request must not reach through chat_template_kwargs
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "processor_kwargs",
    }
)


def check_supported(req: ChatCompletionRequest, allow_request_template: bool) -> None:
    """Refuse what the operator does not allow, with a 400 that says so."""
    if req.chat_template is not None and not allow_request_template:
        raise OpenAIError(
            "a request-supplied chat_template is not allowed on this server", param="chat_template"
        )
    bad = RESERVED_TEMPLATE_KWARGS.intersection(req.chat_template_kwargs or {})
    if bad:
        raise OpenAIError(
            f"chat_template_kwargs may not set {sorted(bad)}", param="chat_template_kwargs"
        )


def _message(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": "system" if m.role == "developer" else m.role,
        "content": m.text(),
    }
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def render_chat(tokenizer: Any, req: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
    """The prompt ids. Templates render in transformers' immutable Jinja sandbox; a template that
    has no place for tools gets them, and the turns that carry calls, as text."""
    messages = [_message(m) for m in req.messages]
    template = req.chat_template or tokenizer.chat_template or ""
    tools: dict[str, Any] = {}
    if "tools" in template:  # such templates take a call's arguments as an object
        tools = {"tools": [{"type": "function", "function": f} for f in plan.tools] or None}
        for m in messages:
            for tc in m.get("tool_calls", []):
                tc["function"]["arguments"] = _arguments_object(tc["function"]["arguments"])
    else:
        messages = prompt_messages(messages, plan)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=req.chat_template,
            **tools,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise OpenAIError(
            f"the chat template could not render these messages: {e}", param="messages"
        ) from e
    return tokenizer.encode(text, add_special_tokens=False)


def generation_defaults(model_path: Path, overrides: dict[str, float] | None) -> dict[str, float]:
    """Sampling defaults as vLLM takes them: the model's generation_config.json, then the
    operator's overrides."""
    found: dict[str, float] = {}
    try:
        found = json.loads((model_path / "generation_config.json").read_text())
    except (OSError, ValueError):
        pass
    defaults = {k: found[k] for k in GENERATION_DEFAULT_KEYS if k in found}
    return defaults | (overrides or {})


def sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    structured: StructuredOutputSpec | None = None,
    defaults: dict[str, float] | None = None,
) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    given = {
        k: v
        for k in req.model_fields_set.intersection(GENERATION_DEFAULT_KEYS)
        if (v := getattr(req, k)) is not None  # null, as in OpenAI's API, means the default
    }
    picked = {"temperature": 1.0, "top_p": 1.0, **(defaults or {}), **given}
    try:
        return SamplingParams(
            n=req.n,
            temperature=picked["temperature"],
            top_p=picked["top_p"],
            top_k=picked.get("top_k") or 0,
            min_p=picked.get("min_p", 0.0),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=picked.get("repetition_penalty", 1.0),
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()} or None,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            structured=structured,
        )
    except ValueError as e:
        raise OpenAIError(str(e), param=str(e).split(" ", 1)[0]) from e


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class LogprobFormatter:
    """Token ids -> the strings and byte lists OpenAI's logprobs carry."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {
            "token": text,
            "logprob": max(logprob, -9999.0),
            "bytes": list(text.encode("utf-8")),
        }

    def chat(self, lps: list[TokenLogprobs]) -> list[dict[str, Any]]:
        return [
            {**self._entry(*lp.chosen), "top_logprobs": [self._entry(*t) for t in lp.top]}
            for lp in lps
        ]

    def completion(self, lps: list[TokenLogprobs], text_offset: int) -> dict[str, Any]:
        tokens = [self.token(lp.chosen.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(text_offset)
            text_offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.chosen.logprob for lp in lps],
            "top_logprobs": [{self.token(t.token_id): t.logprob for t in lp.top} for lp in lps],
            "text_offset": offsets,
        }


def merge_choice(acc: dict[int, dict[str, Any]], c: CompletionOutput) -> None:
    """Accumulate one choice's deltas into a whole (for non-streamed responses)."""
    entry = acc.setdefault(
        c.index, {"text": [], "token_ids": [], "logprobs": [], "finish_reason": None}
    )
    entry["text"].append(c.text)
    entry["token_ids"].extend(c.token_ids)
    entry["logprobs"].extend(c.logprobs or [])
    if c.finish_reason is not None:
        entry["finish_reason"] = c.finish_reason
        entry["stop_reason"] = c.stop_reason
