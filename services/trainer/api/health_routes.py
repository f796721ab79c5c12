"""/health: open to all (no token), 200 once the model serves, 503 while it loads or after it failed to."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.protocol import HealthNotReady, HealthResponse

from .dependencies import Loader

router = APIRouter()


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthNotReady}})
async def health(loader: Loader) -> HealthResponse | JSONResponse:
    if loader.engine is None:
        body = HealthNotReady(
            status="error" if loader.error else "loading",
            error=loader.error,
            loading_s=round(time.time() - loader.started, 1),
        )
        return JSONResponse(status_code=503, content=body.model_dump())
    return loader.engine.health(started_at=loader.started)  # a new started_at = a restarted trainer
