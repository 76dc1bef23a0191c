"""What every API module shares: the per-model entry (tokenizer, defaults, handle), the boundary
checks (API key, header and body limits, JSON, pydantic), bounded off-loop work and the engine
stream. The API modules build on it; the ingress only routes to them."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from model_parallel.loader import resolve_model_path
from model_parallel.structured import StructuredOutputSpec, build_grammar
from serving.chat import LogprobFormatter, generation_defaults
from serving.config import AppConfig, ModelDeployment
from serving.local_handle import LocalHandle
from serving.metrics import metrics_store
from serving.protocol import OpenAIError, from_validation_error
from serving.resumable import MAX_RESUMES, ResumableStream


class ModelEntry:
    """What the ingress keeps per served model."""

    def __init__(self, deployment: ModelDeployment, handle: Any):
        from transformers import AutoTokenizer

        self.name, self.handle = deployment.name, handle
        self.resumable = not isinstance(handle, LocalHandle)  # another replica may continue it
        model = deployment.engine.model
        self.path = resolve_model_path(model.model, model.cache_dir)
        self.defaults = generation_defaults(self.path, deployment.generation_config)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.logprobs = LogprobFormatter(self.tokenizer)
        self.info: dict[str, Any] | None = None

    async def max_model_len(self) -> int:
        if self.info is None:
            self.info = await self.handle.info.remote()
        return self.info["max_model_len"]


async def guarded(handler: Callable[[Request], Any], request: Request) -> Response:
    """OpenAI-shaped errors for every refusal; a bug answers 500 without taking anything down."""
    try:
        return await handler(request)
    except OpenAIError as e:
        return JSONResponse(e.body(), e.status, headers=e.headers)
    except Exception as e:  # noqa: BLE001
        err = OpenAIError(f"internal error: {e!r}"[:1000], 500, type="internal_error")
        return JSONResponse(err.body(), 500)


class Frontend:
    """One ingress replica's models and settings, and the checks every route makes."""

    def __init__(self, config: AppConfig, handles: dict[str, Any], metrics: Any = None):
        """`metrics` renders /metrics; by default the app's MetricsStore actor."""
        self.settings = config.server
        self.models = {m.name: ModelEntry(m, handles[m.name]) for m in config.models}
        self.metrics = metrics or metrics_store(config.name)

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise OpenAIError("invalid or missing API key", 401, code="invalid_api_key")

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        """The authorized request's body as `model`, within the header and body limits."""
        self.authorize(request)
        headers = request.headers.raw
        if (
            len(headers) > self.settings.max_header_count
            or sum(len(k) + len(v) for k, v in headers) > self.settings.max_header_bytes
        ):
            raise OpenAIError("too many or too large headers", 431)
        limit = self.settings.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise OpenAIError(f"request body over {limit} bytes", 413)
        body = await request.body()
        if len(body) > limit:
            raise OpenAIError(f"request body over {limit} bytes", 413)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(f"malformed JSON body: {e}") from e
        if not isinstance(data, dict):
            raise OpenAIError("the body must be a JSON object")
        return validate(model, data)

    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise OpenAIError(
                f"the model {name!r} does not exist", 404, param="model", code="model_not_found"
            )
        return entry

    async def bounded(self, fn: Callable[..., Any], *args: Any, what: str, param: str) -> Any:
        """Request-driven work (templates, grammars) off the event loop, with a time bound; a
        ValueError from it is the request's fault."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(fn, *args), self.settings.template_timeout_s
            )
        except TimeoutError as e:
            raise OpenAIError(f"{what} took too long to process", param=param) from e
        except ValueError as e:
            raise OpenAIError(str(e), param=param) from e

    async def check_guide(self, guide: StructuredOutputSpec, param: str) -> None:
        await self.bounded(build_grammar, guide, what="the structured output spec", param=param)

    async def check_prompt(self, entry: ModelEntry, prompt: list[int], param: str) -> None:
        limit = await entry.max_model_len()
        if len(prompt) >= limit:
            raise OpenAIError(
                f"this model's maximum context length is {limit} tokens, but the "
                f"prompt has {len(prompt)} tokens",
                param=param,
                code="context_length_exceeded",
            )

    def open_stream(
        self, entry: ModelEntry, request_id: str, prompt: list[int], params: Any
    ) -> ResumableStream:
        """The request's stream from the model's LLMServer, continued elsewhere if its replica
        dies (counted in /metrics)."""
        count = lambda: self.metrics.count_resumed.remote(entry.name)  # noqa: E731
        resumes = MAX_RESUMES if entry.resumable else 0
        return ResumableStream(entry.handle, request_id, prompt, params, count, resumes)


def validate(model: type[BaseModel], data: Any) -> Any:
    """`data` as `model`, strictly typed as OpenAI checks it: a 400 naming the field."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        raise from_validation_error(e) from e
