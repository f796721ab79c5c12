"""/logprobs and /grpo/step: what only the trainer does, scoring completions and applying GRPO updates."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.protocol import GrpoStepRequest, GrpoStepResponse, LogprobsRequest, LogprobsResponse

from .dependencies import Loader, check_text, require_token

router = APIRouter(dependencies=[Depends(require_token)])


@router.post("/logprobs")
async def logprobs(req: LogprobsRequest, loader: Loader) -> LogprobsResponse:
    check_text(req)
    return await loader.ready().logprobs(req)


@router.post("/grpo/step")
async def grpo_step(req: GrpoStepRequest, loader: Loader) -> GrpoStepResponse:
    check_text(req)
    return await loader.ready().grpo_step(req)
