"""/v1/models, /v1/completions and /v1/chat/completions: the student served as any OpenAI-compatible server, whole
answers or (stream: true) server-sent events as the tokens are decoded."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from services.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

from ..errors import InvalidRequest
from .dependencies import Loader, Settings, check_budget, check_text, require_token
from .errors import GUARDED, WITH_BODY, error_responses
from .sse import SSE_EVENT, event_stream

router = APIRouter(dependencies=[Depends(require_token)], responses=error_responses(*GUARDED))
GENERATES = error_responses(*WITH_BODY, 503)
BUDGET = (
    "Rules across fields (422 or 400, `error.param` names the field): prompts x n x max_tokens (a missing "
    "max_tokens counts as the whole context, TRAINER_MAX_CONTEXT) must stay within TRAINER_MAX_GENERATION_TOKENS "
    "(422, param max_tokens); each prompt's tokens plus max_tokens must fit the context (400)."
)


@router.get("/v1/models")
async def models(loader: Loader) -> ModelList:
    created = int(loader.started)
    return ModelList(data=[ModelCard(id="student", created=created), ModelCard(id="base", created=created)])


def streamed(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a generation route: the whole answer as JSON, or (stream: true) server-sent events."""
    return {
        200: {
            "description": "the whole answer; with stream: true, server-sent events: `data: <chunk>` lines "
            f"({chunk.__name__}), then `data: [DONE]`",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    }


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**GENERATES, **streamed(CompletionChunk)},
    description=BUDGET + " With stream, echo and logprobs cannot be combined (422, param echo).",
)
async def completions(req: CompletionRequest, settings: Settings, loader: Loader) -> Any:
    check_budget(settings, len(req.prompts) * req.n, req.max_tokens or 16)
    check_text(req)
    if req.stream:
        return event_stream(loader.ready().stream_complete(req))
    return await loader.ready().complete(req)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**GENERATES, **streamed(ChatCompletionChunk)},
    description=BUDGET + " With continue_final_message, `messages` holds at least two and the last is the "
    "assistant's (422, param messages).",
)
async def chat_completions(req: ChatCompletionRequest, settings: Settings, loader: Loader) -> Any:
    check_budget(settings, req.n, req.max_completion_tokens or req.max_tokens)
    check_text(req)
    if req.continue_final_message and len(req.messages) < 2:
        # The continued text follows the template's rendering of the messages before it; there must be some.
        raise InvalidRequest(
            "messages", "continue_final_message needs a message before the assistant's", status=422
        )
    if req.stream:
        return event_stream(loader.ready().stream_chat(req))
    return await loader.ready().chat(req)
