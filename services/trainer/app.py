"""HTTP routes of the trainer service; all work is done by TrainerEngine.

The model loads in a background thread after start-up, so /health answers at once (503 "loading" until ready).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.body_limit import BodySizeLimit

from . import checkpoints as ckpt
from .engine import RequestError, TrainerEngine
from .model_source import ModelSourceError
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GrpoStepRequest,
    LoadCheckpointRequest,
    LogprobsRequest,
    SaveCheckpointRequest,
)
from .settings import TrainerSettings
from .student import load_student

log = logging.getLogger("services.trainer")


class _Loader:
    """Holds the engine once the background load finishes (or the reason it failed)."""

    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        self.engine: TrainerEngine | None = None
        self.error: str | None = None
        self.started = time.time()

    def run(self) -> None:
        try:
            self.engine = TrainerEngine(load_student(self.settings), self.settings)
            log.info("trainer ready in %.1f s", time.time() - self.started)
        except ModelSourceError as exc:
            self.error = str(exc)
            log.error("trainer failed to load: %s", exc)
        except Exception as exc:  # anything else is still reported on /health rather than hanging
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("trainer failed to load")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    """Every error of this service: OpenAI's `error` object, plus `detail` (the message) for FastAPI clients."""

    error: ErrorInfo
    detail: str


class TooLarge(BaseModel):
    detail: str


# Documented on every route, so the OpenAPI schema describes the bodies clients really get (422 included, which
# would otherwise be FastAPI's list-shaped default).
ERROR_RESPONSES = {
    **{code: {"model": ErrorBody} for code in (400, 401, 404, 409, 422, 429, 503, 507)},
    413: {"model": TooLarge, "description": "request body over TRAINER_MAX_REQUEST_BYTES"},
}


MAX_ERRORS = 20  # validation errors spelled out in one 422


def not_unicode(value, path: str = "") -> str | None:
    """The path of the first string in a request that is not valid Unicode (a lone surrogate such as "\\ud800",
    which JSON can carry but no tokenizer can encode), else None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        key = key if str(key).startswith("[") else (f".{key}" if path else str(key))
        if (found := not_unicode(item, f"{path}{key}")) is not None:
            return found
    return None


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={
            "error": {"message": message, "type": kind, "param": field, "code": status},
            "detail": message,
        },
    )


def create_app(settings: TrainerSettings | None = None) -> FastAPI:
    settings = settings or TrainerSettings()
    loader = _Loader(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=loader.run, name="trainer-loader", daemon=True).start()
        yield
        if loader.engine is not None:
            loader.engine.close()

    app = FastAPI(
        title="alphazero-llm-trainer: trainer service", lifespan=lifespan, responses=ERROR_RESPONSES
    )
    app.state.loader = loader
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, setting="TRAINER_MAX_REQUEST_BYTES")

    def engine() -> TrainerEngine:
        if loader.engine is None:
            raise _NotReady(loader.error)
        return loader.engine

    @app.middleware("http")
    async def bearer_auth(request: Request, call_next):
        token = settings.api_token.get_secret_value() if settings.api_token else None
        given = request.headers.get("authorization", "").encode()
        authorised = secrets.compare_digest(given, f"Bearer {token}".encode())
        if token and request.url.path != "/health" and not authorised:
            return _error(401, "missing or wrong bearer token", "Authorization")
        return await call_next(request)

    in_flight = 0

    @app.middleware("http")
    async def bounded_in_flight(request: Request, call_next):
        # Outermost (added last): a refused request is answered before its body is read or anything is queued.
        nonlocal in_flight
        if request.url.path == "/health":
            return await call_next(request)
        if in_flight >= settings.max_requests_in_flight:
            message = f"{in_flight} requests in flight, the limit (TRAINER_MAX_REQUESTS_IN_FLIGHT)"
            return _error(429, message, headers={"Retry-After": "1"})
        in_flight += 1
        try:
            return await call_next(request)
        finally:
            in_flight -= 1

    def check_budget(rows: int, max_tokens: int | None) -> None:
        """rows (prompts x n) x max_tokens within TRAINER_MAX_GENERATION_TOKENS, checked before anything runs.
        No max_tokens means up to the whole context; a max_tokens beyond the context is the engine's 400."""
        per_row = min(max_tokens or settings.max_context, settings.max_context)
        if rows * per_row > settings.max_generation_tokens:
            raise RequestError(
                "max_tokens",
                f"prompts x n x max_tokens = {rows} x {per_row} = {rows * per_row} exceeds the limit of "
                f"{settings.max_generation_tokens} tokens (TRAINER_MAX_GENERATION_TOKENS)",
                status=422,
            )

    def check_text(req: BaseModel) -> None:
        if (field := not_unicode(req.model_dump(exclude_defaults=True))) is not None:
            raise RequestError(field, "not valid Unicode (a lone UTF-16 surrogate)", status=422)

    @app.exception_handler(_NotReady)
    async def not_ready(_: Request, exc: _NotReady):
        return _error(503, f"model failed to load: {exc.reason}" if exc.reason else "model is loading")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        # FastAPI's own errors (a body that is not JSON, an unknown route, a wrong method) in this service's shape.
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: RequestError):
        return _error(exc.status, str(exc), exc.field)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        fields = [".".join(str(p) for p in e["loc"] if p != "body") for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields[:MAX_ERRORS], errors))
        if len(errors) > MAX_ERRORS:  # the answer stays small whatever the request
            message += f"; ... {len(errors)} errors in all"
        return _error(422, message, fields[0] if fields else None)

    @app.exception_handler(TemplateError)
    async def template_refused(_: Request, exc: TemplateError):
        # The model's chat template rejects these messages (e.g. roles that do not alternate, for some models).
        return _error(400, f"the chat template refused the messages: {exc}", "messages")

    @app.exception_handler(FloatingPointError)
    async def not_finite(_: Request, exc: FloatingPointError):
        # A GRPO step whose loss or gradient overflowed (e.g. advantage 1e16 or weight 1e308): nothing was applied,
        # and the numbers came from the request, so it is the client's to fix.
        return _error(422, f"{exc} (are advantages or weights too large?)", "items")

    @app.exception_handler(ckpt.CheckpointNotFound)
    async def not_found(_: Request, exc: ckpt.CheckpointNotFound):
        return _error(404, str(exc), "name")

    @app.exception_handler(ckpt.CheckpointCorrupt)
    async def corrupt(_: Request, exc: ckpt.CheckpointCorrupt):
        return _error(409, str(exc), "name")

    @app.exception_handler(ckpt.CheckpointWriteError)
    async def write_failed(_: Request, exc: ckpt.CheckpointWriteError):
        return _error(507 if exc.out_of_space else 500, str(exc), "name")  # the previous checkpoint is intact

    @app.get("/health")
    async def health():
        if loader.engine is None:
            status = "error" if loader.error else "loading"
            return JSONResponse(
                status_code=503,
                content={
                    "status": status,
                    "error": loader.error,
                    "loading_s": round(time.time() - loader.started, 1),
                },
            )
        return {**loader.engine.health(), "started_at": loader.started}  # a new value = a restarted trainer

    @app.get("/v1/models")
    async def models():
        created = int(loader.started)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "alphazero-llm-trainer"}
                for name in ("student", "base")
            ],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = 1 if isinstance(req.prompt, str) else len(req.prompt)
        check_budget(prompts * req.n, req.max_tokens or 16)
        check_text(req)
        return await engine().complete(req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_budget(req.n, req.max_completion_tokens or req.max_tokens)
        check_text(req)
        if req.continue_final_message and len(req.messages) < 2:
            # The continued text follows the template's rendering of the messages before it; there must be some.
            raise RequestError("messages", "continue_final_message needs a message before the assistant's", 422)
        return await engine().chat(req)

    @app.post("/logprobs")
    async def logprobs(req: LogprobsRequest):
        check_text(req)
        return await engine().logprobs(req)

    @app.post("/grpo/step")
    async def grpo_step(req: GrpoStepRequest):
        check_text(req)
        return await engine().grpo_step(req)

    @app.post("/checkpoints")
    async def save_checkpoint(req: SaveCheckpointRequest | None = None):
        return await engine().save_checkpoint(req.name if req else None)

    @app.post("/checkpoints/load")
    async def load_checkpoint(req: LoadCheckpointRequest):
        return await engine().load_checkpoint(req.name)

    @app.get("/checkpoints")
    async def list_checkpoints():
        return engine().list_checkpoints()

    return app


class _NotReady(Exception):
    def __init__(self, reason: str | None):
        super().__init__(reason or "loading")
        self.reason = reason
