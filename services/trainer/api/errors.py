"""Every error of the trainer as one body (services.protocol.ErrorBody): TrainerErrors as they were raised,
FastAPI's own errors (validation, unknown route, wrong method) in the same shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.protocol import ErrorBody, ErrorInfo, TooLarge

from ..errors import TrainerError

MAX_ERRORS = 20  # validation errors spelled out in one 422

# Documented on every route, so the OpenAPI schema describes the bodies clients really get (422 included, which
# would otherwise be FastAPI's list-shaped default).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{code: {"model": ErrorBody} for code in (400, 401, 404, 409, 422, 429, 503, 507)},
    413: {"model": TooLarge, "description": "request body over TRAINER_MAX_REQUEST_BYTES"},
}


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
        fields = [".".join(str(p) for p in e["loc"] if p != "body") for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields[:MAX_ERRORS], errors, strict=False))
        if len(errors) > MAX_ERRORS:  # the answer stays small whatever the request
            message += f"; ... {len(errors)} errors in all"
        return error_response(422, message, fields[0] if fields else None)
