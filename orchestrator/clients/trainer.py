"""Async client for the trainer service's own routes (/health, /logprobs, /grpo/step, /checkpoints).

Chat and completions from the student go through `LLMPool` like any OpenAI-compatible server; this client
covers the rest. It speaks services.protocol, the trainer's one wire contract: every request is built from the
protocol's request model (so a bad request fails here, before it is sent) and every answer is validated into
the protocol's response model (so an answer of another shape is a TrainerError now, not a KeyError later).
Idempotent calls are retried on 503 (model loading), 429/5xx, connection errors and broken JSON; a /grpo/step
is retried only when it carries a step_key, which makes a replay harmless on the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from orchestrator.clients.http import async_client
from orchestrator.clients.llm import RETRYABLE_STATUS, RetryPolicy, cut_off, first_error, parse_retry_after
from services.protocol import (
    CheckpointInfo,
    CheckpointList,
    GrpoStepItem,
    GrpoStepRequest,
    GrpoStepResponse,
    HealthResponse,
    LoadCheckpointRequest,
    LogprobsItem,
    LogprobsRequest,
    LogprobsResponse,
    LossSettings,
    ModelName,
    SaveCheckpointRequest,
)

Answer = TypeVar("Answer", bound=BaseModel)
Result = TypeVar("Result")

# What went wrong, set where a TrainerError is raised (as LLMError's kinds; nothing parses the message):
# "timeout", "connection", "malformed" (a 200 that is not JSON), "protocol" (JSON of another shape than the
# protocol's answer), "invalid_request" (the request breaks the protocol; not sent), "unavailable" (the trainer
# stayed away too long) or "http_<status>".
TrainerErrorKind = str


class TrainerError(Exception):
    def __init__(self, status: int | None, message: str, kind: TrainerErrorKind, retryable: bool = False):
        self.status, self.message, self.kind, self.retryable = status, message, kind, retryable
        super().__init__(f"trainer {'HTTP ' + str(status) if status else 'error'}: {message}")


def _request(model: type[Answer], fields: Mapping[str, Any], path: str) -> Answer:
    """The protocol's request model for `path`; a TrainerError (kind invalid_request) when it breaks it."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise TrainerError(None, f"{path}: invalid request, {first_error(exc)}", "invalid_request") from exc


def _answer(model: type[Answer], content: bytes, path: str) -> Answer:
    """The trainer's 200 answer validated into the protocol's response model."""
    try:
        return model.model_validate_json(content)
    except ValidationError as exc:
        if cut_off(exc):
            raise TrainerError(
                200, f"{path}: response is not valid JSON", "malformed", retryable=True
            ) from exc
        message = f"{path}: response does not match the protocol, {first_error(exc)}"
        raise TrainerError(200, message, "protocol") from exc


class TrainerClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8001",
        api_token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        headers = {"Content-Type": "application/json"}
        if api_token:
            headers["Authorization"] = f"Bearer {api_token}"
        self._client = async_client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,  # None: aiohttp's (orchestrator/clients/http.py); a test or bench may give one
        )
        self.requests = 0

    @classmethod
    def from_settings(cls, settings, **kwargs) -> TrainerClient:
        token = settings.api_token.get_secret_value() if settings.api_token is not None else None
        return cls(settings.trainer_url, api_token=token, **kwargs)

    async def __aenter__(self) -> TrainerClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- routes -----------------------------------------------------------------------------------------
    async def health(self) -> HealthResponse:
        """A serving trainer's /health; while it loads (503) or after its load failed, a TrainerError."""
        return await self._call("GET", "/health", None, HealthResponse)

    async def logprobs(
        self, items: Sequence[LogprobsItem | Mapping[str, Any]], model: ModelName = "student"
    ) -> LogprobsResponse:
        """The log-probs of each item's completion under `model`, one result per item in order."""
        request = _request(LogprobsRequest, {"model": model, "items": items}, "/logprobs")
        return await self._call("POST", "/logprobs", request, LogprobsResponse)

    async def grpo_step(
        self,
        items: Sequence[GrpoStepItem | Mapping[str, Any]],
        loss: LossSettings | None = None,
        step_key: str | None = None,
    ) -> GrpoStepResponse:
        """One GRPO update (`loss` None = the protocol's default settings)."""
        fields = {"items": items, "loss": loss or LossSettings(), "step_key": step_key}
        request = _request(GrpoStepRequest, fields, "/grpo/step")
        return await self._call(
            "POST", "/grpo/step", request, GrpoStepResponse, idempotent=step_key is not None
        )

    async def save_checkpoint(self, name: str | None = None) -> CheckpointInfo:
        request = _request(SaveCheckpointRequest, {"name": name}, "/checkpoints")
        return await self._call("POST", "/checkpoints", request, CheckpointInfo, idempotent=False)

    async def load_checkpoint(self, name: str) -> CheckpointInfo:
        request = _request(LoadCheckpointRequest, {"name": name}, "/checkpoints/load")
        return await self._call("POST", "/checkpoints/load", request, CheckpointInfo)

    async def list_checkpoints(self) -> CheckpointList:
        return await self._call("GET", "/checkpoints", None, CheckpointList)

    async def wait_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> HealthResponse:
        """Poll /health until the service serves (it says 503 while loading)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await self.health()
            except TrainerError:
                pass
            if time.monotonic() > deadline:
                raise TrainerError(None, f"not ready after {timeout_s:g}s", "unavailable")
            await asyncio.sleep(poll_s)

    # --- transport ----------------------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        request: BaseModel | None,
        answer: type[Answer],
        idempotent: bool = True,
    ) -> Answer:
        content = request.model_dump_json(exclude_none=True).encode() if request is not None else None
        attempts = self.retry.max_retries + 1 if idempotent else 1
        last: TrainerError | None = None
        for attempt in range(attempts):
            retry_after = None
            try:
                self.requests += 1
                response = await self._client.request(method, path, content=content)
                if response.status_code == 200:
                    return _answer(answer, response.content, path)
                last = TrainerError(
                    response.status_code,
                    f"{path}: {response.text[:300]}",
                    f"http_{response.status_code}",
                    retryable=response.status_code in RETRYABLE_STATUS,
                )
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            except TrainerError as exc:  # a 200 that is not the protocol's answer
                last = exc
            except httpx.TimeoutException as exc:
                last = TrainerError(
                    None, f"{path}: timeout ({type(exc).__name__})", "timeout", retryable=True
                )
            except httpx.TransportError as exc:
                last = TrainerError(
                    None, f"{path}: connection error ({type(exc).__name__})", "connection", retryable=True
                )
            if not last.retryable or attempt == attempts - 1:
                break
            await asyncio.sleep(self.retry.delay(attempt, retry_after))
        assert last is not None
        raise last


# --- a trainer that may die and come back -----------------------------------------------------------------
class TrainerRestarted(Exception):
    """The trainer answering now is another process than the one the job's state lives in (its /health
    `started_at` changed): everything since the job's last checkpoint is gone from it."""

    def __init__(self, health: HealthResponse):
        self.health = health
        super().__init__(f"the trainer restarted (started_at {health.started_at}, step {health.step})")


class TrainerUnavailable(TrainerError):
    """The trainer stayed unreachable for longer than the job may wait (TRAINER_WAIT_S)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(status, message, "unavailable")


class TrainerWatch:
    """Bracket a job's trainer calls with /health checks, so a kill -9 and restart cannot go unnoticed.

    While the trainer is unreachable (or loading) the job waits, at most `wait_s` seconds per outage, and says
    so through `emit` ("trainer_unavailable", then "trainer_back"). A trainer that comes back as a new process
    (another /health `started_at`) raises TrainerRestarted, and the job rewinds to its last checkpoint. If the
    instance is the same before and after a call, that call reached the process the job's state lives in.
    """

    def __init__(
        self,
        client: TrainerClient,
        wait_s: float,
        emit: Callable[..., Awaitable[None]],
        poll_s: float = 1.0,
        max_rounds: int = 3,
    ):
        self.client, self.wait_s, self.emit, self.poll_s = client, wait_s, emit, poll_s
        self.max_rounds = max_rounds
        self.instance: float | None = None

    def accept(self, health: HealthResponse) -> None:
        """The trainer process the job's state now lives in."""
        self.instance = health.started_at

    async def health(self) -> HealthResponse:
        """/health of a ready trainer, waiting (bounded) while it is unreachable or loading."""
        try:
            return await self.client.health()
        except TrainerError as exc:
            problem = str(exc)
        await self.emit("trainer_unavailable", error=problem[:300], wait_s=self.wait_s)
        started = time.monotonic()
        try:
            health = await self.client.wait_ready(timeout_s=self.wait_s, poll_s=self.poll_s)
        except TrainerError as exc:
            raise TrainerUnavailable(
                None, f"not reachable for {self.wait_s:g} s (TRAINER_WAIT_S); last error: {problem[:300]}"
            ) from exc
        await self.emit(
            "trainer_back",
            waited_s=round(time.monotonic() - started, 1),
            restarted=health.started_at != self.instance,
            step=health.step,
        )
        return health

    async def check(self) -> HealthResponse:
        """Raise TrainerRestarted unless the same trainer process is (still, or again) there."""
        health = await self.health()
        if health.started_at != self.instance:
            raise TrainerRestarted(health)
        return health

    async def call(self, fn: Callable[[], Awaitable[Result]]) -> Result:
        """`await fn()` on the known trainer process. A lost connection (or 5xx) waits for the trainer; the
        call is made again if the same process answers (only for calls that are safe to repeat: a step with a
        step_key, a checkpoint save by name), TrainerRestarted if another does. 4xx and 507 are raised."""
        for round_ in range(self.max_rounds):
            try:
                result = await fn()
            except TrainerError as exc:
                if not exc.retryable or round_ == self.max_rounds - 1:
                    raise
                await self.check()
                continue
            await self.check()
            return result
        raise AssertionError("unreachable")
