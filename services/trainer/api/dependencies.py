"""What routes depend on: the settings, the loaded engine (503 until it is), the bearer token, and the request
checks that need the settings (the generation budget) or run on the whole body (valid Unicode).

The dependencies are `async def` though they never await: FastAPI runs a plain `def` dependency in its thread
pool, a hand-off to a worker thread and back per dependency and request (three per completion), which a py-spy
profile at 255 requests in flight put at ~7% of the process's GIL time, beside the decode thread."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from ..errors import InvalidRequest, TrainerError
from ..settings import TrainerSettings
from .loader import EngineLoader


async def get_settings(request: Request) -> TrainerSettings:
    return request.app.state.settings


async def get_loader(request: Request) -> EngineLoader:
    return request.app.state.loader


Settings = Annotated[TrainerSettings, Depends(get_settings)]
# Routes ask the loader for the engine (`loader.ready()`, 503 until loaded) after their own checks, not as a
# dependency: dependencies run before the body is validated, and a bad request is a 422 even while loading.
Loader = Annotated[EngineLoader, Depends(get_loader)]


async def require_token(request: Request, settings: Settings) -> None:
    """TRAINER_API_TOKEN (or API_TOKEN), when set, as `Authorization: Bearer <token>` (401 otherwise)."""
    if settings.api_token is None:
        return
    given = request.headers.get("authorization", "").encode()
    expected = f"Bearer {settings.api_token.get_secret_value()}".encode()
    if not secrets.compare_digest(given, expected):
        raise TrainerError("missing or wrong bearer token", field="Authorization", status=401)


def check_budget(settings: TrainerSettings, rows: int, max_tokens: int | None) -> None:
    """rows (prompts x n) x max_tokens within TRAINER_MAX_GENERATION_TOKENS, checked before anything runs.
    No max_tokens means up to the whole context; a max_tokens beyond the context is the engine's 400."""
    per_row = min(max_tokens or settings.max_context, settings.max_context)
    if rows * per_row > settings.max_generation_tokens:
        raise InvalidRequest(
            "max_tokens",
            f"prompts x n x max_tokens = {rows} x {per_row} = {rows * per_row} exceeds the limit of "
            f"{settings.max_generation_tokens} tokens (TRAINER_MAX_GENERATION_TOKENS)",
            status=422,
        )


def check_text(req: BaseModel) -> None:
    """422 naming the first string that no tokenizer can encode."""
    if (field := not_unicode(req.model_dump(exclude_defaults=True))) is not None:
        raise InvalidRequest(field, "not valid Unicode (a lone UTF-16 surrogate)", status=422)


def not_unicode(value: Any, path: str = "") -> str | None:
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
