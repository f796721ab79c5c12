"""The student's adapter versions on a server that loads LoRA adapters at runtime (vLLM started with --enable-lora
and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; docs/vllm-student.md): which versions are loaded there, which requests
use them, and when one can go.

    adapters = StudentAdapters.from_settings(settings)           # None when STUDENT_URL is unset
    await adapters.publish(step["adapter_version"], step["adapter_path"])     # after each /grpo/step
    completion, version = await adapters.run(lambda model: pool.chat(spec.model_copy(update={"model": model}), ...))

Each version is loaded under a name of its own, "<STUDENT_MODEL>-v<N>": one name reloaded in place lets requests
and vLLM's prefix cache mix weights (the notes in docs/vllm-student.md). `publish` loads a version and makes it the
current one; requests lease the current version for as long as they run; a version that is neither current nor
leased is unloaded. The server forgets its adapters when it restarts: a request answered 404 for its adapter's name
makes `restore` load the current version again, and the request is retried once under it.

A path names one adapter: the trainer writes the same version number again with other weights only under another
path (after a checkpoint load), and a name already loaded from another path is unloaded and loaded anew.
Failures are typed: AdapterLoadRefused when the server will not load an adapter (the status and its message),
StudentServerUnreachable when it does not answer; nothing here waits without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TypeVar

import httpx

from orchestrator.clients.http import async_client
from orchestrator.clients.llm import Completion, LLMError, LLMPool, RetryPolicy, api_key, parse_retry_after
from orchestrator.settings import EndpointSpec, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
# Answers that may go away by themselves; anything else from a load is the server's verdict on the adapter.
TRANSIENT_STATUS = frozenset({408, 425, 429, 502, 503, 504})


class StudentServerError(Exception):
    """Something the student server did or did not do; `status` is its HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class AdapterLoadRefused(StudentServerError):
    """The server answered a load with an error: the path is not readable there (404), the adapter does not fit
    its flags (400, e.g. a rank over --max-lora-rank), or its files are broken (500)."""

    def __init__(self, name: str, path: str, status: int, message: str):
        self.name, self.path = name, path
        super().__init__(
            f"the student server refused to load {name} from {path}: HTTP {status}: {message}", status
        )


class StudentServerUnreachable(StudentServerError):
    """No usable answer from the server after the retries (connection refused, timeouts, 502-504)."""


class NoAdapterPublished(StudentServerError):
    """A request asked for the current version before any was published."""

    def __init__(self) -> None:
        super().__init__("no adapter version has been published to the student server yet")


@dataclass(frozen=True)
class AdapterVersion:
    version: int
    name: str  # the model name requests ask for
    path: str  # the adapter directory as the server reads it


@dataclass(eq=False)
class _Loaded:
    adapter: AdapterVersion
    leases: int = 0


class StudentAdapters:
    def __init__(
        self,
        base_url: str,
        *,
        name_prefix: str = "student",
        api_key: str | None = None,
        adapter_dir: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """base_url: the server's OpenAI base URL (with /v1). adapter_dir: the trainer's export folder as the
        server sees it; None = the trainer's paths are valid there as they are (one volume, one mount point)."""
        self.base_url = base_url.rstrip("/")
        self.name_prefix = name_prefix
        self.adapter_dir = adapter_dir
        self.retry = retry or RetryPolicy()
        self.current: AdapterVersion | None = None
        self._loaded: dict[str, _Loaded] = {}
        self._lock = asyncio.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = async_client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,  # None: aiohttp's (orchestrator/clients/http.py); a test may give one
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> StudentAdapters | None:
        server = settings.student_server()
        if server is None:
            return None
        return cls(
            server.base_url,
            name_prefix=settings.student_model,
            api_key=api_key(server),
            adapter_dir=settings.student_adapter_dir or None,
            timeout_s=server.timeout_s,
            **kwargs,
        )

    async def __aenter__(self) -> StudentAdapters:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def name_of(self, version: int) -> str:
        return f"{self.name_prefix}-v{version}"

    def loaded(self) -> list[AdapterVersion]:
        """The versions this client has loaded on the server, oldest first."""
        return sorted((e.adapter for e in self._loaded.values()), key=lambda a: a.version)

    # --- versions -------------------------------------------------------------------------------------------
    async def publish(self, version: int, path: str) -> AdapterVersion:
        """Load `version` from the trainer's `path` (idempotent) and make it the current one; versions no
        request uses any more are unloaded. Raises AdapterLoadRefused or StudentServerUnreachable, and then the
        previous current version stays current."""
        adapter = AdapterVersion(version, self.name_of(version), self._server_path(path))
        async with self._lock:
            entry = self._loaded.get(adapter.name)
            if entry is None or entry.adapter != adapter:
                if entry is not None:  # the same number with other weights: the trainer was rewound
                    await self._unload(adapter.name)
                await self._load(adapter)
                self._loaded[adapter.name] = _Loaded(adapter)
            self.current = adapter
            await self._unload_unused()
        return adapter

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[AdapterVersion]:
        """The current version, kept loaded until the block ends (the request's sample came from it)."""
        if self.current is None:
            raise NoAdapterPublished()
        adapter = self.current
        entry = self._loaded[adapter.name]
        entry.leases += 1
        try:
            yield adapter
        finally:
            entry.leases -= 1
            if entry.leases == 0 and adapter != self.current:
                async with self._lock:
                    await self._unload_unused()

    async def run(self, request: Callable[[str], Awaitable[T]]) -> tuple[T, AdapterVersion]:
        """`request(model_name)` under the current version; returns its result and the version it came from. A
        404 (the server lost its adapters in a restart) loads the current version again and retries once."""
        for attempt in range(2):
            async with self.lease() as adapter:
                try:
                    return await request(adapter.name), adapter
                except LLMError as exc:
                    if exc.status != 404 or attempt == 1:
                        raise
                    log.warning(
                        "student server answered 404 for %s: loading the current version again", adapter.name
                    )
            await self.restore()
        raise AssertionError("unreachable")

    async def chat(self, pool: LLMPool, endpoint: EndpointSpec, messages: list[dict], **params) -> Completion:
        """`pool.chat` on the server of `endpoint` under the current version (`run`: leased, and retried once
        after a restart); the completion says the version it came from (vLLM's answers do not)."""
        completion, adapter = await self.run(
            lambda model: pool.chat(endpoint.model_copy(update={"model": model}), messages, **params)
        )
        completion.adapter_version = adapter.version
        return completion

    async def restore(self) -> None:
        """Bring the server back in line after it lost adapters (a restart): forget what it no longer lists and
        load the current version again."""
        async with self._lock:
            listed = await self._listed()
            for name, entry in list(self._loaded.items()):
                if listed.get(name) == entry.adapter.path:
                    continue
                if self.current is not None and name == self.current.name:
                    await self._load(entry.adapter)  # the same entry: its leases stay counted
                else:
                    del self._loaded[name]

    # --- the server's routes --------------------------------------------------------------------------------
    async def _load(self, adapter: AdapterVersion) -> None:
        body = {"lora_name": adapter.name, "lora_path": adapter.path}
        response = await self._post("/load_lora_adapter", body)
        if response.status_code == 200:
            log.info("student server loaded %s from %s", adapter.name, adapter.path)
            return
        if response.status_code == 400:
            # vLLM refuses a name it has loaded already (e.g. before this orchestrator restarted), with the
            # same 400 as other refusals: its model list tells whether that name is this very adapter.
            listed = await self._listed()
            if listed.get(adapter.name) == adapter.path:
                return
            if adapter.name in listed:  # loaded from another path: replace it
                await self._unload(adapter.name)
                response = await self._post("/load_lora_adapter", body)
                if response.status_code == 200:
                    return
        raise AdapterLoadRefused(adapter.name, adapter.path, response.status_code, _error_message(response))

    async def _unload(self, name: str) -> None:
        try:
            response = await self._post("/unload_lora_adapter", {"lora_name": name})
        except StudentServerUnreachable as exc:  # an adapter left loaded costs a slot, not correctness
            log.warning("could not unload %s from the student server: %s", name, exc)
            return
        if response.status_code not in (200, 404):  # 404: not loaded (any more), which is what we wanted
            log.warning("student server refused to unload %s: HTTP %d", name, response.status_code)

    async def _unload_unused(self) -> None:
        """With the lock held: unload every version that is neither current nor leased."""
        for name, entry in list(self._loaded.items()):
            if entry.leases == 0 and entry.adapter != self.current:
                await self._unload(name)
                del self._loaded[name]

    async def _listed(self) -> dict[str, str]:
        """The adapters the server serves now: name -> the path it loaded it from (vLLM lists each adapter in
        /v1/models with its path as `root`)."""
        response = await self._request("GET", "/models")
        if response.status_code != 200:
            raise StudentServerError(f"GET /models: HTTP {response.status_code}", response.status_code)
        try:
            cards = response.json()["data"]
            return {c["id"]: c.get("root") for c in cards if c.get("parent") is not None}
        except (ValueError, KeyError, TypeError) as exc:
            raise StudentServerError(f"GET /models: not a model list ({type(exc).__name__})", 200) from exc

    async def _post(self, path: str, body: dict) -> httpx.Response:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """One route, retried on connection errors, timeouts and the transient statuses; the final answer
        (whatever its status) comes back, or StudentServerUnreachable."""
        why = ""
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                response = await self._client.request(method, path, json=body)
                if response.status_code not in TRANSIENT_STATUS:
                    return response
                why = f"HTTP {response.status_code}"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            except httpx.TimeoutException as exc:
                why = f"timeout ({type(exc).__name__})"
            except httpx.TransportError as exc:
                why = f"connection error ({type(exc).__name__})"
            if attempt < self.retry.max_retries:
                await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise StudentServerUnreachable(f"student server {self.base_url}{path}: {why}")

    def _server_path(self, path: str) -> str:
        if self.adapter_dir is None:
            return path
        return str(PurePosixPath(self.adapter_dir) / PurePosixPath(path).name)


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}}), else the start of the text."""
    try:
        return str(response.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
