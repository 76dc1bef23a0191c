"""The OpenAIIngress deployment: routes each path to its API module (serving/api/) over one
shared Frontend. CPU only; the API modules talk to each model's LLMServer through a streaming
DeploymentHandle.

NOTE: no `from __future__ import annotations` here: FastAPI reads the route signatures.
"""

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from serving.api.chat import ChatHandler
from serving.api.completions import CompletionsHandler
from serving.api.responses import ResponsesHandler
from serving.api.tokenize import TokenizeHandler
from serving.config import AppConfig
from serving.frontend import Frontend, ModelEntry, guarded

app = FastAPI(title="llmcluster", docs_url=None, redoc_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: AppConfig, handles: dict[str, Any], metrics: Any = None):
        self.front = Frontend(config, handles, metrics)
        self.chat = ChatHandler(self.front)
        self.completions = CompletionsHandler(self.front)
        self.responses = ResponsesHandler(self.front)
        self.tokens = TokenizeHandler(self.front)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await guarded(self.chat.handle, request)

    @app.post("/v1/completions")
    async def completions_route(self, request: Request) -> Response:
        return await guarded(self.completions.handle, request)

    @app.post("/v1/responses")
    async def create_response(self, request: Request) -> Response:
        return await guarded(self.responses.create, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str, request: Request) -> Response:
        return await guarded(lambda req: self.responses.get(req, response_id), request)

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await guarded(self.tokens.tokenize, request)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await guarded(self.tokens.detokenize, request)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        async def cards(req: Request) -> Response:
            self.front.authorize(req)
            data = [await self._model_card(m) for m in self.front.models.values()]
            return JSONResponse({"object": "list", "data": data})

        return await guarded(cards, request)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> Response:
        async def one(req: Request) -> Response:
            self.front.authorize(req)
            return JSONResponse(await self._model_card(self.front.model(model_id)))

        return await guarded(one, request)

    @app.get("/health")
    async def health(self) -> Response:
        models = self.front.models.values()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(m.handle.check_health.remote() for m in models)), timeout=10
            )
        except Exception as e:  # noqa: BLE001 - any failure means not healthy
            return JSONResponse({"status": "unhealthy", "reason": repr(e)[:500]}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        async def render(req: Request) -> Response:
            self.front.authorize(req)
            text = await self.front.metrics.render.remote()
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

        return await guarded(render, request)

    async def _model_card(self, m: ModelEntry) -> dict[str, Any]:
        return {
            "id": m.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "llmcluster",
            "root": str(m.path),
            "max_model_len": await m.max_model_len(),
        }
