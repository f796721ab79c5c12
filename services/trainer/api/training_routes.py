"""/logprobs and /grpo/step: what only the trainer does, scoring completions and applying GRPO updates."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.protocol import GrpoStepRequest, GrpoStepResponse, LogprobsRequest, LogprobsResponse

from .dependencies import Loader, check_text, require_token
from .errors import GUARDED, WITH_BODY, error_responses

router = APIRouter(
    dependencies=[Depends(require_token)], responses=error_responses(*GUARDED, *WITH_BODY, 503)
)


@router.post(
    "/logprobs",
    description="Each item gives exactly one of prompt and messages; the prompt, context and completion must fit "
    "the model's context together (400).",
)
async def logprobs(req: LogprobsRequest, loader: Loader) -> LogprobsResponse:
    check_text(req)
    return await loader.ready().logprobs(req)


@router.post(
    "/grpo/step",
    description="Each item gives exactly one of prompt and messages; a completion must have at least one token "
    "and old_logprobs (when given) one value per completion token (400, param items[i].completion or "
    "items[i].old_logprobs); a step whose loss or gradient is not finite is refused whole (422, param items) "
    "and nothing is applied.",
)
async def grpo_step(req: GrpoStepRequest, loader: Loader) -> GrpoStepResponse:
    check_text(req)
    return await loader.ready().grpo_step(req)
