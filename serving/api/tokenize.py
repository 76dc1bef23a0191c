"""vLLM's POST /tokenize and POST /detokenize: what the engine would see for a prompt or a chat
(through the same template and tools as /v1/chat/completions), and ids back to text."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serving.chat import check_supported, render_chat
from serving.frontend import Frontend, ModelEntry
from serving.protocol import ChatCompletionRequest, DetokenizeRequest, OpenAIError, TokenizeRequest
from serving.tool_calls import plan_tools

CHAT_FIELDS = (
    "messages",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
)


class TokenizeHandler:
    def __init__(self, front: Frontend):
        self.front = front

    def _model(self, name: str | None) -> ModelEntry:
        """vLLM lets a one-model server's callers leave the model out."""
        if name is None:
            if len(self.front.models) != 1:
                raise OpenAIError("model is required on a server with several", param="model")
            return next(iter(self.front.models.values()))
        return self.front.model(name)

    async def tokenize(self, request: Request) -> Response:
        req: TokenizeRequest = await self.front.parse(request, TokenizeRequest)
        entry = self._model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give either prompt or messages", param="prompt")
        tokenizer = entry.tokenizer
        if req.prompt is not None:
            ids = tokenizer.encode(
                req.prompt, add_special_tokens=req.add_special_tokens is not False
            )
        else:
            chat = ChatCompletionRequest.model_construct(
                model=entry.name, **{k: getattr(req, k) for k in CHAT_FIELDS}
            )
            check_supported(chat, self.front.settings.allow_request_chat_template)
            ids = await self.front.bounded(
                render_chat,
                tokenizer,
                chat,
                plan_tools(chat),
                what="the chat template",
                param="messages",
            )
            if req.add_special_tokens and tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id, *ids]
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": await entry.max_model_len(),
                "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids)
                if req.return_token_strs
                else None,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        req: DetokenizeRequest = await self.front.parse(request, DetokenizeRequest)
        entry = self._model(req.model)
        vocab = len(entry.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise OpenAIError(f"token ids must be in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": entry.tokenizer.decode(req.tokens)})
