"""The reference teacher's HTTP layer: settings from the environment, the FastAPI app over the engine, `main`.

The request and response bodies are the OpenAI chat models of services/protocol/openai.py (the trainer's), with
the model name free (this server serves "reference", not "student"/"base") and no adapter version.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.reference_teacher.engine import ReferenceTeacher
from orchestrator.reference_teacher.errors import ReferenceTeacherError, UnknownModel, Unsupported
from orchestrator.reference_teacher.references import ReferenceBook
from orchestrator.reference_teacher.tokens import TokenCounter
from services.protocol.openai import AssistantMessage, ChatChoice, ChatCompletionRequest, Usage

MAX_ERRORS = 20  # validation errors spelled out in one 422


class ReferenceTeacherSettings(BaseSettings):
    """REFERENCE_TEACHER_* environment variables; the GSM8K folder is GSM8K_PATH, as for the other services."""

    model_config = SettingsConfigDict(env_prefix="REFERENCE_TEACHER_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8010
    model_name: str = "reference"
    tokenizer: str | None = None  # a tokenizer.json: usage counted in that model's tokens
    gsm8k_path: str | None = Field(
        default=None, validation_alias=AliasChoices("REFERENCE_TEACHER_GSM8K_PATH", "GSM8K_PATH")
    )


class TeacherChatRequest(ChatCompletionRequest):
    """The trainer's chat request with any model name (checked against the one this server serves)."""

    model: str  # type: ignore[assignment]


class TeacherChatResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}, "detail": message}
    return JSONResponse(status_code=status, content=body)


def create_app(
    settings: ReferenceTeacherSettings | None = None, teacher: ReferenceTeacher | None = None
) -> FastAPI:
    """The FastAPI app; the reference solutions load when it is built (7,473 problems, well under a second)."""
    settings = settings or ReferenceTeacherSettings()
    if teacher is None:
        teacher = ReferenceTeacher(
            ReferenceBook.from_gsm8k(settings.gsm8k_path),
            TokenCounter(settings.tokenizer),
            settings.model_name,
        )
    started = time.time()
    app = FastAPI(title="alphazero-llm-trainer: reference teacher")
    app.state.teacher = teacher

    @app.exception_handler(ReferenceTeacherError)
    async def refused(_: Request, exc: ReferenceTeacherError):
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        fields = [".".join(str(p) for p in e["loc"] if p != "body") for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields[:MAX_ERRORS], errors, strict=False))
        return _error(422, message, fields[0] if fields else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        c = teacher.counters
        return {
            "status": "ok",
            "model": teacher.model,
            "problems": len(teacher.book),
            "requests": c.requests,
            "choices": c.choices,
            "completion_tokens": c.completion_tokens,
            "unknown_questions": c.unknown_questions,
            "unreadable_prompts": c.unreadable_prompts,
            "by_mode": dict(c.by_mode),
            "tokens": "tokenizer" if teacher.tokens.tokenizer is not None else "word pieces",
        }

    @app.get("/v1/models")
    async def models():
        card = {"id": teacher.model, "object": "model", "created": int(started), "owned_by": "reference"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=TeacherChatResponse)
    async def chat_completions(req: TeacherChatRequest) -> TeacherChatResponse:
        if req.model != teacher.model:
            raise UnknownModel(
                f"model {req.model!r} is not served here; this server serves {teacher.model!r}"
            )
        if req.logprobs:
            raise Unsupported(
                "log-probs are not available: the reference teacher has no model to take them from"
            )
        reply = teacher.chat(
            [m.model_dump() for m in req.messages],
            n=req.n,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            stop=req.stop_strings,
            seed=req.seed,
        )
        return TeacherChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=teacher.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    logprobs=None,
                )
                for i, c in enumerate(reply.choices)
            ],
            usage=Usage(
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=reply.completion_tokens,
                total_tokens=reply.prompt_tokens + reply.completion_tokens,
            ),
        )

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="The reference teacher: GSM8K train reference solutions over the OpenAI chat API."
    )
    p.add_argument("--host", default=None, help="default REFERENCE_TEACHER_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default REFERENCE_TEACHER_PORT or 8010")
    p.add_argument(
        "--gsm8k",
        default=None,
        help="GSM8K folder with train.jsonl (default GSM8K_PATH, else the hub, else the shipped copy)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="a tokenizer.json to count usage in (default: word pieces)"
    )
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    given = {"host": args.host, "port": args.port, "gsm8k_path": args.gsm8k, "tokenizer": args.tokenizer}
    settings = ReferenceTeacherSettings(**{k: v for k, v in given.items() if v is not None})
    if settings.tokenizer and not Path(settings.tokenizer).is_file():
        p.error(f"--tokenizer {settings.tokenizer}: no such file")
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0
