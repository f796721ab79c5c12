"""An async client pool for OpenAI-compatible servers (vLLM, OpenRouter, the trainer service).

Per server (base_url), one httpx client on aiohttp (orchestrator/clients/http.py: connections kept alive and
shared by every request and endpoint of that server; requests go straight to the client's transport, see
`_Server`), a concurrency limit per endpoint, an optional global limit on requests in flight across every search, timeouts, and retries with jittered
exponential backoff on 429 / 5xx / connection errors / timeouts / malformed JSON, honouring `Retry-After`.
API keys come from the environment variable an endpoint names; they are sent as a Bearer header and never
appear in errors, logs or reprs.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

import certifi
import httpx
from pydantic import ValidationError

from orchestrator.clients.http import async_client
from orchestrator.settings import EndpointSpec
from services.protocol import ReceivedChatCompletion, ReceivedCompletion
from services.protocol.openai import ReceivedChatChoice

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


# What went wrong, set where an LLMError is raised (reports and events carry it; nothing parses the message):
# "timeout", "connection", "malformed" (a 200 that is not a completion), "no_logprobs", or "http_<status>".
ErrorKind = str


class LLMError(Exception):
    """A request to an endpoint failed for good. No secrets in it: endpoint name, status, a short message."""

    def __init__(
        self, endpoint: str, status: int | None, message: str, kind: ErrorKind, retryable: bool = False
    ):
        self.endpoint = endpoint
        self.status = status
        self.message = message
        self.kind = kind
        self.retryable = retryable
        super().__init__(f"[{endpoint}] {'HTTP ' + str(status) if status else 'error'}: {message}")


class LogprobsUnavailable(LLMError):
    """Log-probs were asked for and the server answered without them."""

    def __init__(self, endpoint: str):
        super().__init__(
            endpoint,
            None,
            "logprobs were requested but the server returned none "
            "(does this server support logprobs for this model?)",
            kind="no_logprobs",
        )


@dataclass
class Choice:
    text: str
    finish_reason: str | None
    token_logprobs: list[float] | None = None
    eos: bool = False  # the model ended the sequence itself (vLLM's stop_reason null), not a stop string
    # The sampled token ids (vLLM with `return_token_ids: true`), an end-of-sequence token included: what the
    # trainer must score for token_logprobs to line up (sampled text does not always tokenise back to them).
    token_ids: list[int] | None = None
    tokens: list[str] | None = None  # the sampled tokens' text, one per log-prob (with log-probs only)

    @property
    def mean_logprob(self) -> float | None:
        if not self.token_logprobs:
            return None
        return sum(self.token_logprobs) / len(self.token_logprobs)


@dataclass
class Completion:
    choices: list[Choice]
    usage: dict = field(default_factory=dict)
    adapter_version: int | None = None
    endpoint: str = ""
    latency_s: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """Full-jitter exponential backoff: wait U(0, min(cap, base * 2**attempt)), or Retry-After when given."""

    max_retries: int = 3
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0
    retry_after_max_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max_s)
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * (2**attempt)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def api_key(endpoint: EndpointSpec, environ: dict | None = None) -> str | None:
    if not endpoint.api_key_env:
        return None
    return (environ if environ is not None else os.environ).get(endpoint.api_key_env) or None


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


Received = ReceivedChatCompletion | ReceivedCompletion
Answer = TypeVar("Answer", ReceivedChatCompletion, ReceivedCompletion)


def parse_completion(data: Received, endpoint: str, want_logprobs: bool) -> Completion:
    """A server's answer (validated by `_post` into the protocol's lenient models) -> Completion."""
    choices = []
    for c in sorted(data.choices, key=lambda c: c.index):
        tokens: list[str] | None = None
        if isinstance(c, ReceivedChatChoice):
            text = c.message.content if c.message is not None else None
            lp = c.logprobs
            token_logprobs = [t.logprob for t in lp.content or []] if lp is not None else None
            if lp is not None and lp.content and all(t.token is not None for t in lp.content):
                tokens = [t.token or "" for t in lp.content]
        else:
            text = c.text
            lp = c.logprobs
            token_logprobs = [x for x in lp.token_logprobs or [] if x is not None] if lp is not None else None
            if lp is not None and lp.tokens is not None and lp.token_logprobs is not None:
                pairs = zip(lp.tokens, lp.token_logprobs, strict=False)
                tokens = [t for t, x in pairs if x is not None]
        if want_logprobs and token_logprobs is None:
            raise LogprobsUnavailable(endpoint)
        # vLLM says stop_reason null when the model ended the sequence itself; a server without the field says nothing
        eos = c.finish_reason == "stop" and "stop_reason" in c.model_fields_set and c.stop_reason is None
        choices.append(
            Choice(
                text=text or "",
                finish_reason=c.finish_reason,
                token_logprobs=token_logprobs,
                eos=eos,
                token_ids=c.token_ids,
                tokens=tokens,
            )
        )
    return Completion(
        choices=choices, usage=data.usage or {}, endpoint=endpoint, adapter_version=data.adapter_version
    )


def cut_off(exc: ValidationError) -> bool:
    """A 200's body was not JSON at all (cut off, most likely: asking again may well get a whole one), as
    opposed to JSON of another shape than the answer expected (asking again would not help)."""
    return any(
        error["type"] == "json_invalid" for error in exc.errors(include_url=False, include_input=False)
    )


def first_error(exc: ValidationError) -> str:
    """Where and what, of the first thing a body got wrong ("choices.0.text: Input should be ...")."""
    first = exc.errors(include_url=False, include_input=False)[0]
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{'.'.join(str(part) for part in first['loc']) or 'body'}: {first['msg']}{more}"


def _malformed(endpoint: str, exc: ValidationError) -> LLMError:
    message = (
        "response is not valid JSON"
        if cut_off(exc)
        else f"malformed completion response ({first_error(exc)})"
    )
    return LLMError(endpoint, 200, message, kind="malformed", retryable=True)


class LLMPool:
    """Shared by every search of a process. Use as `async with LLMPool(...) as pool:`."""

    def __init__(
        self,
        max_in_flight: int | None = None,
        retry: RetryPolicy | None = None,
        environ: dict | None = None,
        extra_headers: dict | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.retry = retry or RetryPolicy()
        self._transport = transport  # None = real HTTP; an in-process transport for benchmarks
        self._environ = environ
        self._extra_headers = dict(extra_headers or {})
        self._base_url_keys: dict[str, str] = {}  # fallback Bearer keys per server (the trainer's API_TOKEN)
        self._servers: dict[str, _Server] = {}  # per server: its client and the transport that serves it
        self._ssl_context: ssl.SSLContext | None = None
        self._endpoint_limits: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._targets: dict[tuple, _Target] = {}
        self._global_limit = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        # Counters for stats and the bench; plain ints mutated only from the event loop.
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.retries = 0

    @classmethod
    def from_settings(cls, settings, **kwargs) -> LLMPool:
        pool = cls(max_in_flight=settings.max_requests_in_flight, **kwargs)
        if getattr(settings, "api_token", None) is not None:
            # The trainer's routes need the deployment's API_TOKEN once set; no endpoint names a key env.
            pool._base_url_keys[settings.trainer_v1.rstrip("/")] = settings.api_token.get_secret_value()
        return pool

    async def __aenter__(self) -> LLMPool:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            await server.client.aclose()

    def _server(self, endpoint: EndpointSpec) -> _Server:
        """The client of the endpoint's server, opened on first use (aiohttp pools its connections)."""
        base = endpoint.base_url.rstrip("/")
        server = self._servers.get(base)
        if server is None:
            if self._ssl_context is None:  # building one costs ~40 ms: share it between the clients
                self._ssl_context = ssl.create_default_context(cafile=certifi.where())
            client = async_client(transport=self._transport, verify=self._ssl_context)
            # The transport `client.send` would choose (a proxy from the environment, or the direct one).
            server = self._servers[base] = _Server(client, client._transport_for_url(httpx.URL(base)))
        return server

    def _target(self, endpoint: EndpointSpec, path: str) -> _Target:
        """Everything about one endpoint's route that does not change between requests, computed once: the
        parsed URL, the timeout and the raw request headers (Host, content type, the Bearer key)."""
        secret = api_key(endpoint, self._environ) or self._base_url_keys.get(endpoint.base_url.rstrip("/"))
        key = (endpoint.base_url, path, endpoint.timeout_s, secret)  # a changed key makes a new target
        target = self._targets.get(key)
        if target is None:
            url = httpx.URL(endpoint.base_url.rstrip("/") + path)
            timeout = httpx.Timeout(endpoint.timeout_s, connect=min(endpoint.timeout_s, 10.0)).as_dict()
            headers = {
                "Host": url.netloc.decode("ascii"),
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",
                "Connection": "keep-alive",
                "Content-Type": "application/json",
                "User-Agent": "alphazero-llm-trainer",
                **self._extra_headers,
            }
            if secret:
                headers["Authorization"] = f"Bearer {secret}"
            raw = [(k.encode("ascii"), v.encode("latin-1")) for k, v in headers.items()]
            target = self._targets[key] = _Target(url, {"timeout": timeout}, raw, secret)
        return target

    def _limit(self, endpoint: EndpointSpec) -> asyncio.Semaphore:
        key = (endpoint.base_url, endpoint.name)
        sem = self._endpoint_limits.get(key)
        if sem is None:
            sem = self._endpoint_limits[key] = asyncio.Semaphore(endpoint.max_concurrency)
        return sem

    async def chat(
        self, endpoint: EndpointSpec, messages: list[dict], retry: RetryPolicy | None = None, **params
    ) -> Completion:
        """POST /chat/completions. `params` are OpenAI fields (n, max_tokens, temperature, stop, seed,
        logprobs, top_logprobs, ...) plus vLLM extensions (continue_final_message, add_generation_prompt).
        `retry` overrides the pool's retry policy for this call."""
        payload = {"model": endpoint.model, "messages": messages, **_drop_none(params)}
        want = bool(payload.get("logprobs"))
        data, latency = await self._post(
            endpoint, "/chat/completions", payload, ReceivedChatCompletion, retry
        )
        completion = parse_completion(data, endpoint.name, want_logprobs=want)
        completion.latency_s = latency
        return completion

    async def complete(
        self, endpoint: EndpointSpec, prompt: str, retry: RetryPolicy | None = None, **params
    ) -> Completion:
        """POST /completions (raw prompt). `logprobs` is an int here, as in the OpenAI completions API."""
        payload = {"model": endpoint.model, "prompt": prompt, **_drop_none(params)}
        want = payload.get("logprobs") is not None and payload.get("logprobs") is not False
        data, latency = await self._post(endpoint, "/completions", payload, ReceivedCompletion, retry)
        completion = parse_completion(data, endpoint.name, want_logprobs=want)
        completion.latency_s = latency
        return completion

    async def _post(
        self,
        endpoint: EndpointSpec,
        path: str,
        payload: dict,
        answer: type[Answer],
        retry: RetryPolicy | None = None,
    ) -> tuple[Answer, float]:
        """POST with retries; a 200's body validated into `answer`. Invalid JSON (a cut-off body) is asked for
        again; valid JSON of another shape is raised at once (kind "malformed"), as asking again would not help."""
        retry = retry or self.retry
        target = self._target(endpoint, path)
        content = _encode_json(payload)
        headers = [*target.headers, (b"Content-Length", str(len(content)).encode("ascii"))]
        last: LLMError | None = None
        for attempt in range(retry.max_retries + 1):
            retry_after = None
            try:
                async with self._slot(endpoint):
                    started = time.perf_counter()
                    status, body, response = await self._server(endpoint).post(target, headers, content)
                    latency = time.perf_counter() - started
                if status == 200:
                    try:
                        return answer.model_validate_json(body), latency
                    except ValidationError as exc:
                        last = _malformed(endpoint.name, exc)
                        if not cut_off(exc):
                            raise last from exc
                else:
                    detail = _scrub(body[:300].decode("utf-8", "replace"), target.secret)
                    retryable = status in RETRYABLE_STATUS
                    last = LLMError(
                        endpoint.name,
                        status,
                        detail or response.reason_phrase,
                        kind=f"http_{status}",
                        retryable=retryable,
                    )
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
            except httpx.TimeoutException as exc:
                last = LLMError(
                    endpoint.name,
                    None,
                    f"timeout after {endpoint.timeout_s:g}s ({type(exc).__name__})",
                    kind="timeout",
                    retryable=True,
                )
            except httpx.TransportError as exc:
                last = LLMError(
                    endpoint.name,
                    None,
                    f"connection error ({type(exc).__name__})",
                    kind="connection",
                    retryable=True,
                )
            self.errors[endpoint.name] += 1
            if not last.retryable or attempt == retry.max_retries:
                break
            self.retries += 1
            await asyncio.sleep(retry.delay(attempt, retry_after))
        assert last is not None
        raise last

    def _slot(self, endpoint: EndpointSpec):
        return _Slot(self, self._limit(endpoint))

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "retries": self.retries,
            "errors": dict(self.errors),
        }


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    extensions: dict  # {"timeout": ...}, read by the transport
    headers: list[tuple[bytes, bytes]]  # every header but Content-Length
    secret: str | None  # the Bearer key, scrubbed from error messages


class _Server:
    """The client of one server and the transport that serves it. Requests go straight to that transport: the
    pool needs none of the client's per-request work (URL merging, header defaults, cookies, auth and redirect
    handling, request logging), and that work cost more CPU than the HTTP exchange itself."""

    def __init__(self, client: httpx.AsyncClient, transport: httpx.AsyncBaseTransport):
        self.client, self.transport = client, transport

    async def post(
        self, target: _Target, headers: list[tuple[bytes, bytes]], content: bytes
    ) -> tuple[int, bytes, httpx.Response]:
        request = httpx.Request(
            "POST",
            target.url,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions=target.extensions,
        )
        request.read()  # marks the body as loaded (`request.content`), for transports that read it whole
        response = await self.transport.handle_async_request(request)
        try:
            body = await response.aread()  # decodes gzip/deflate, as the client would
        finally:
            await response.aclose()  # the connection goes back to the pool
        return response.status_code, body, response


class _Slot:
    """Holds the global and the per-endpoint limit around one HTTP attempt (not across backoff sleeps)."""

    def __init__(self, pool: LLMPool, endpoint_limit: asyncio.Semaphore):
        self.pool, self.endpoint_limit = pool, endpoint_limit

    async def __aenter__(self):
        # Endpoint first: a request queued behind a saturated endpoint must not hold a global slot that
        # another endpoint's request could use.
        await self.endpoint_limit.acquire()
        if self.pool._global_limit is not None:
            try:
                await self.pool._global_limit.acquire()
            except BaseException:
                self.endpoint_limit.release()
                raise
        pool = self.pool
        pool.requests += 1
        pool.in_flight += 1
        pool.max_in_flight = max(pool.max_in_flight, pool.in_flight)

    async def __aexit__(self, *exc):
        self.pool.in_flight -= 1
        self.endpoint_limit.release()
        if self.pool._global_limit is not None:
            self.pool._global_limit.release()


def _drop_none(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


# Compact JSON (no spaces after separators), an encoder built once instead of per call.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode_json(payload: Any) -> bytes:
    return _JSON_ENCODER.encode(payload).encode("utf-8")
