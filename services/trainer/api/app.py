"""The trainer's FastAPI app: the routers, the body-size and in-flight limits, the error handlers, and the
background load of the engine (its lifespan)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from services.allowed_methods import AllowedMethods
from services.body_limit import BodySizeLimit

from ..gc_pauses import GcPauses
from ..settings import TrainerSettings
from . import checkpoint_routes, health_routes, openai_routes, training_routes
from .errors import error_response, install_error_handlers
from .loader import EngineLoader


def create_app(settings: TrainerSettings | None = None) -> FastAPI:
    settings = settings or TrainerSettings()
    loader = EngineLoader(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gc_pauses = GcPauses()
        threading.Thread(target=loader.run, name="trainer-loader", daemon=True).start()
        yield
        app.state.gc_pauses.close()
        if loader.engine is not None:
            loader.engine.close()

    app = FastAPI(title="alphazero-llm-trainer: trainer service", lifespan=lifespan)
    app.state.settings = settings
    app.state.loader = loader
    for module in (health_routes, openai_routes, training_routes, checkpoint_routes):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes, setting="TRAINER_MAX_REQUEST_BYTES"
    )
    app.state.http_counters = HttpCounters()
    app.add_middleware(InFlightLimit, limit=settings.max_requests_in_flight, counters=app.state.http_counters)
    app.add_middleware(AllowedMethods)  # outermost: OPTIONS is answered before any limit or route
    return app


@dataclass
class HttpCounters:
    """Requests answered (all but /health) and their wall time in all, for /health's `service`."""

    requests: int = 0
    seconds: float = 0.0


class InFlightLimit:
    """Requests being served or waiting at once (all but /health) up to a limit; past it 429 with Retry-After,
    answered before the body is read or anything is queued. A request counts until its answer is fully sent, a
    streamed one until its last event; then its wall time goes to `counters`.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`app.middleware("http")`) runs every request in a
    task group of its own with streams between the two halves, the largest cost of a completion on the event
    loop in a profile at 255 requests in flight."""

    def __init__(self, app: ASGIApp, limit: int, counters: HttpCounters):
        self.app = app
        self.limit = limit
        self.counters = counters
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            message = f"{self.in_flight} requests in flight, the limit (TRAINER_MAX_REQUESTS_IN_FLIGHT)"
            await error_response(429, message, headers={"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight += 1
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.counters.requests += 1
            self.counters.seconds += time.perf_counter() - started
