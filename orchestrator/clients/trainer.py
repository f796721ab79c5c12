"""Async client for the trainer service's own routes (/health, /logprobs, /grpo/step, /checkpoints).

Chat and completions from the student go through `LLMPool` like any OpenAI-compatible server; this client
covers the rest. Idempotent calls are retried on 503 (model loading), 429/5xx and connection errors; a
/grpo/step is retried only when it carries a step_key, which makes a replay harmless on the server.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from orchestrator.clients.http_transport import lean_transport_for
from orchestrator.clients.llm import RETRYABLE_STATUS, RetryPolicy, parse_retry_after


class TrainerError(Exception):
    def __init__(self, status: int | None, message: str, retryable: bool = False):
        self.status, self.message, self.retryable = status, message, retryable
        super().__init__(f"trainer {'HTTP ' + str(status) if status else 'error'}: {message}")


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
        headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            # Plain http (the usual trainer on the same host or network) skips httpcore: see http_transport.py.
            transport=transport or lean_transport_for(self.base_url),
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
    async def health(self) -> dict:
        return await self._call("GET", "/health")

    async def logprobs(self, items: list[dict], model: str = "student") -> dict:
        """items: [{prompt?|messages?, context?, completion}] -> {adapter_version, results:[{mean, ...}]}."""
        return await self._call("POST", "/logprobs", {"model": model, "items": items})

    async def grpo_step(self, items: list[dict], loss: dict, step_key: str | None = None) -> dict:
        body = {"items": items, "loss": loss}
        if step_key is not None:
            body["step_key"] = step_key
        return await self._call("POST", "/grpo/step", body, idempotent=step_key is not None)

    async def save_checkpoint(self, name: str | None = None) -> dict:
        return await self._call("POST", "/checkpoints", {"name": name} if name else {}, idempotent=False)

    async def load_checkpoint(self, name: str) -> dict:
        return await self._call("POST", "/checkpoints/load", {"name": name})

    async def list_checkpoints(self) -> dict:
        return await self._call("GET", "/checkpoints")

    async def wait_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> dict:
        """Poll /health until the service answers "ok" (it says 503 while loading)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                health = await self.health()
                if health.get("status") == "ok":
                    return health
            except TrainerError:
                pass
            if time.monotonic() > deadline:
                raise TrainerError(None, f"not ready after {timeout_s:g}s")
            await asyncio.sleep(poll_s)

    # --- transport ----------------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: dict | None = None, idempotent: bool = True) -> dict:
        attempts = self.retry.max_retries + 1 if idempotent else 1
        last: TrainerError | None = None
        for attempt in range(attempts):
            retry_after = None
            try:
                self.requests += 1
                response = await self._client.request(method, path, json=body)
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last = TrainerError(200, f"{path}: response is not valid JSON", retryable=True)
                else:
                    last = TrainerError(
                        response.status_code,
                        f"{path}: {response.text[:300]}",
                        retryable=response.status_code in RETRYABLE_STATUS,
                    )
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
            except httpx.TimeoutException as exc:
                last = TrainerError(None, f"{path}: timeout ({type(exc).__name__})", retryable=True)
            except httpx.TransportError as exc:
                last = TrainerError(None, f"{path}: connection error ({type(exc).__name__})", retryable=True)
            if not last.retryable or attempt == attempts - 1:
                break
            await asyncio.sleep(self.retry.delay(attempt, retry_after))
        assert last is not None
        raise last


# --- a trainer that may die and come back -----------------------------------------------------------------
class TrainerRestarted(Exception):
    """The trainer answering now is another process than the one the job's state lives in (its /health
    `started_at` changed): everything since the job's last checkpoint is gone from it."""

    def __init__(self, health: dict):
        self.health = health
        super().__init__(
            f"the trainer restarted (started_at {health.get('started_at')}, step {health.get('step')})"
        )


class TrainerUnavailable(TrainerError):
    """The trainer stayed unreachable for longer than the job may wait (TRAINER_WAIT_S)."""


def instance_of(health: dict) -> object:
    """What tells one trainer process from the next: /health `started_at` (None when the server has none)."""
    return health.get("started_at")


class TrainerWatch:
    """Bracket a job's trainer calls with /health checks, so a kill -9 and restart cannot go unnoticed.

    While the trainer is unreachable (or loading) the job waits, at most `wait_s` seconds per outage, and says
    so through `emit` ("trainer_unavailable", then "trainer_back"). A trainer that comes back as a new process
    raises TrainerRestarted, and the job rewinds to its last checkpoint. If the instance is the same before and
    after a call, that call reached the process the job's state lives in.
    """

    def __init__(self, client: TrainerClient, wait_s: float, emit, poll_s: float = 1.0, max_rounds: int = 3):
        self.client, self.wait_s, self.emit, self.poll_s = client, wait_s, emit, poll_s
        self.max_rounds = max_rounds
        self.instance: object = None

    def accept(self, health: dict) -> None:
        """The trainer process the job's state now lives in."""
        self.instance = instance_of(health)

    async def health(self) -> dict:
        """/health of a ready trainer, waiting (bounded) while it is unreachable or loading."""
        try:
            health = await self.client.health()
            if health.get("status") == "ok":
                return health
            problem = f"status {health.get('status')!r}"
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
            restarted=instance_of(health) != self.instance,
            step=health.get("step"),
        )
        return health

    async def check(self) -> dict:
        """Raise TrainerRestarted unless the same trainer process is (still, or again) there."""
        health = await self.health()
        if instance_of(health) != self.instance:
            raise TrainerRestarted(health)
        return health

    async def call(self, fn):
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
