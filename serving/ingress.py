"""The OpenAIIngress deployment: routes, auth, validation, error mapping and SSE. CPU only; it
renders chats and talks to each model's LLMServer through a streaming DeploymentHandle.

NOTE: no `from __future__ import annotations` here: FastAPI reads the route signatures, and Serve
ships the ingress class by value, so every helper it uses is defined above it.
"""

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from model_parallel.loader import resolve_model_path
from model_parallel.structured import StructuredOutputSpec, build_grammar
from serving.chat import (
    LogprobFormatter,
    check_supported,
    generation_defaults,
    render_chat,
    sampling_params,
)
from serving.chat_view import ChatView
from serving.completions import CompletionsHandler
from serving.config import AppConfig, ModelDeployment
from serving.metrics import metrics_store
from serving.protocol import ChatCompletionRequest, OpenAIError, from_validation_error
from serving.resumable import ResumableStream
from serving.streams import first_output, sse
from serving.structured_outputs import requested_guide
from serving.tool_calls import plan_tools

app = FastAPI(title="llmcluster", docs_url=None, redoc_url=None)


class ModelEntry:
    """What the ingress keeps per served model."""

    def __init__(self, deployment: ModelDeployment, handle: Any):
        from transformers import AutoTokenizer

        self.name, self.handle = deployment.name, handle
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


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: AppConfig, handles: dict[str, Any]):
        self.settings = config.server
        self.models = {m.name: ModelEntry(m, handles[m.name]) for m in config.models}
        self.metrics = metrics_store(config.name)
        self.completions = CompletionsHandler(self)

    # --- boundary checks -------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise OpenAIError("invalid or missing API key", 401, code="invalid_api_key")

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
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
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from e

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
        return ResumableStream(entry.handle, request_id, prompt, params, count)

    # --- routes ----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await guarded(self._chat, request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await guarded(self.completions.handle, request)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return await guarded(self._models, request)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> Response:
        async def one(req: Request) -> Response:
            self.authorize(req)
            return JSONResponse(await self._model_card(self.model(model_id)))

        return await guarded(one, request)

    @app.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(m.handle.check_health.remote() for m in self.models.values())),
                timeout=10,
            )
        except Exception as e:  # noqa: BLE001 - any failure means not healthy
            return JSONResponse({"status": "unhealthy", "reason": repr(e)[:500]}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        async def render(req: Request) -> Response:
            self.authorize(req)
            return PlainTextResponse(
                await self.metrics.render.remote(), media_type="text/plain; version=0.0.4"
            )

        return await guarded(render, request)

    # --- handlers --------------------------------------------------------------------------

    async def _model_card(self, m: ModelEntry) -> dict[str, Any]:
        return {
            "id": m.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "llmcluster",
            "root": str(m.path),
            "max_model_len": await m.max_model_len(),
        }

    async def _models(self, request: Request) -> Response:
        self.authorize(request)
        cards = [await self._model_card(m) for m in self.models.values()]
        return JSONResponse({"object": "list", "data": cards})

    async def _chat(self, request: Request) -> Response:
        self.authorize(request)
        req: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        entry = self.model(req.model)
        check_supported(req, self.settings.allow_request_chat_template)
        if req.n > self.settings.max_n:
            raise OpenAIError(f"n must be in [1, {self.settings.max_n}]", param="n")
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError("top_logprobs requires logprobs=true", param="top_logprobs")
        plan = plan_tools(req)
        asked = requested_guide(req, req.response_format)
        if asked is not None and plan.parses_calls:
            raise OpenAIError(
                "a structured output cannot be combined with tool calls (set tool_choice 'none')",
                param=asked[0],
            )
        guide = plan.guide()  # plan_tools checked each function's schema
        if asked is not None:
            param, guide = asked
            await self.check_guide(guide, param)
        prompt = await self.bounded(
            render_chat, entry.tokenizer, req, plan, what="the chat template", param="messages"
        )
        await self.check_prompt(entry, prompt, "messages")
        params = sampling_params(
            req,
            req.max_completion_tokens or req.max_tokens,
            (req.top_logprobs or 0) if req.logprobs else None,
            guide,
            entry.defaults,
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self.open_stream(entry, rid, prompt, params)
        first = await first_output(stream)
        view = ChatView(rid, req, entry.logprobs, plan)
        if req.stream:
            return StreamingResponse(
                sse(view.chunks(first, stream), stream), media_type="text/event-stream"
            )
        outputs = [first] + [o async for o in stream]
        return JSONResponse(view.response(outputs))
