"""The orchestrator's REST API: a thin HTTP layer over the JobManager.

    POST /train, POST /eval            -> 202 {job_id}
    GET  /jobs, GET /jobs/{id}          status, progress, metrics, result
    GET  /jobs/{id}/events              server-sent events, replayed from Last-Event-ID
    GET  /jobs/{id}/steps               per-step metrics of a train job
    POST /jobs/{id}/cancel, /resume
    GET  /jobs/{id}/trees/{n}           one search tree as JSON (?format=svg for a picture)
    GET  /jobs/{id}/results.jsonl       per-problem eval results; /jobs/{id}/files/{name} other job files
    GET  /health                        reachability of every configured endpoint
    GET  /metrics                       Prometheus
OpenAPI docs at /docs. With API_TOKEN set, every route but /health needs `Authorization: Bearer <token>`.
The routes are job_routes.py and service_routes.py; what they share (settings, manager, auth) dependencies.py.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from orchestrator.api import job_routes, service_routes
from orchestrator.api.dependencies import StreamCount
from orchestrator.jobs.manager import JobManager, JobNotFound, JobsBusy
from orchestrator.runners.telemetry import Telemetry
from orchestrator.settings import Settings
from services.allowed_methods import AllowedMethods
from services.body_limit import BodySizeLimit

MAX_ERRORS = 50  # validation errors listed in one 422
RETRY_AFTER_S = 30  # the Retry-After of a 429 when the job queue is full


def json_safe(value: Any) -> Any:
    """NaN and +-Infinity (which Python's JSON parser accepts from a client) as strings: JSON has no such numbers,
    and echoing one back in a 422 made the response itself fail with a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


async def invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = json_safe(jsonable_encoder(errors[:MAX_ERRORS]))
    if len(errors) > MAX_ERRORS:  # 60k unknown fields in a 1 MiB body made a 6 MiB answer
        detail.append({"type": "too_many_errors", "loc": ["body"], "msg": f"{len(errors)} errors in all"})
    return JSONResponse({"detail": detail}, status_code=422)


async def job_not_found(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobNotFound)
    return JSONResponse({"detail": f"no job {exc.args[0]!r}"}, status_code=404)


async def jobs_busy(_request: Request, exc: Exception) -> JSONResponse:
    # Refused rather than queued without bound; a queued job takes at least seconds, so ask for 30.
    return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})


def create_app(settings: Settings | None = None, manager: JobManager | None = None) -> FastAPI:
    settings = settings or Settings()
    telemetry = manager.telemetry if manager and manager.telemetry else Telemetry()
    manager = manager or JobManager(settings, telemetry=telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.start()
        yield
        await manager.close()

    app = FastAPI(
        title="alphazero-llm-trainer orchestrator",
        version="0.1.0",
        lifespan=lifespan,
        description="Train a small LLM on GSM8K with AlphaZero-style MCTS + GRPO. Jobs run in the "
        "background; follow them with GET /jobs/{id} or the SSE stream.",
    )
    app.state.settings, app.state.manager, app.state.telemetry = settings, manager, telemetry
    app.state.streams = StreamCount()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, setting="MAX_REQUEST_BYTES")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        telemetry.http_requests.labels(
            method=request.method, route=getattr(route, "path", "unmatched"), status=str(response.status_code)
        ).inc()
        return response

    app.add_middleware(AllowedMethods)  # outermost: OPTIONS is answered before any limit or route

    app.include_router(job_routes.router)
    app.include_router(service_routes.router)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(JobNotFound, job_not_found)
    app.add_exception_handler(JobsBusy, jobs_busy)
    return app
