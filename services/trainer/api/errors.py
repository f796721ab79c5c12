"""Every error of the trainer as one body (services.protocol.ErrorBody): TrainerErrors as they were raised,
FastAPI's own errors (validation, unknown route, wrong method) in the same shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.protocol import ErrorBody, ErrorInfo, TooLarge, is_branch_tag

from ..errors import TrainerError

MAX_ERRORS = 20  # validation errors spelled out in one 422

RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "string"}}
}
ERROR_DESCRIPTIONS = {
    400: "the request cannot be served as given: the prompt with max_tokens exceeds the model's context, "
    "old_logprobs do not match the completion's tokens, a chat template refuses the messages, or the body is "
    "not JSON",
    401: "missing or wrong bearer token (TRAINER_API_TOKEN or API_TOKEN)",
    404: "no checkpoint of that name",
    409: "the checkpoint is incomplete, fails its hashes, or does not fit this model; nothing was applied",
    413: "request body over TRAINER_MAX_REQUEST_BYTES",
    422: "a field fails its check; `error.param` names it",
    429: "TRAINER_MAX_REQUESTS_IN_FLIGHT requests are in flight; see Retry-After",
    503: "the model is still loading, or failed to load",
    507: "no room for the checkpoint: past TRAINER_CHECKPOINT_MAX_BYTES, or the disk would keep less than "
    "TRAINER_CHECKPOINT_MIN_FREE_BYTES free (nothing was written), or the disk is full",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of the error statuses a route answers with, each with the body clients really get
    (the service's one error shape; 422 included, which would otherwise be FastAPI's list-shaped default)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": TooLarge if code == 413 else ErrorBody, "description": ERROR_DESCRIPTIONS[code]}
        if code == 429:
            out[code]["headers"] = RETRY_AFTER
    return out


# What every route but /health may answer: no token, too many requests in flight.
GUARDED = (401, 429)
# What a route with a JSON body may answer besides: unreadable, too large, a field that fails its check.
WITH_BODY = (400, 413, 422)


def error_response(
    status: int,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    kind: str | None = None,
) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = ErrorBody(error=ErrorInfo(message=message, type=kind, param=field, code=status), detail=message)
    return JSONResponse(
        status_code=status, headers=dict(headers) if headers else None, content=body.model_dump()
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TrainerError)
    async def trainer_error(_: Request, exc: TrainerError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.field, kind=exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own errors (a body that is not JSON, an unknown route, a wrong method) in this service's shape.
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = [".".join(str(p) for p in e["loc"] if p != "body" and not is_branch_tag(p)) for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields[:MAX_ERRORS], errors, strict=False))
        if len(errors) > MAX_ERRORS:  # the answer stays small whatever the request
            message += f"; ... {len(errors)} errors in all"
        return error_response(422, message, fields[0] if fields else None)
