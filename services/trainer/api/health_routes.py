"""/health: open to all (no token), 200 once the model serves, 503 while it loads, after it failed to, or after
the engine process (TRAINER_ENGINE_PROCESS) stopped."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.protocol import HealthNotReady, HealthResponse

from ..errors import EngineStopped
from .dependencies import Loader

router = APIRouter()


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthNotReady}})
async def health(request: Request, loader: Loader) -> HealthResponse | JSONResponse:
    if loader.engine is not None and loader.failure() is None:
        http = request.app.state.http_counters
        try:  # a new started_at = a restarted trainer
            return await loader.engine.health(
                started_at=loader.started,
                http_requests=http.requests,
                http_seconds=http.seconds,
                gc_pauses=request.app.state.gc_pauses,
            )
        except EngineStopped:
            pass  # it stopped while we asked: answered as below
    error = loader.failure()
    body = HealthNotReady(
        status="error" if error else "loading", error=error, loading_s=round(time.time() - loader.started, 1)
    )
    return JSONResponse(status_code=503, content=body.model_dump())
