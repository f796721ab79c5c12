"""The orchestrator's HTTP client: httpx's API over aiohttp's connection pool and C response parser.

Every outgoing request of the service (teachers, the checker, the student and the trainer's own routes) goes
through `async_client`, an `httpx.AsyncClient` whose transport is httpx-aiohttp's `AiohttpTransport`: httpx keeps
the request and response objects, timeouts, proxies from the environment and the exception classes the callers
handle, and aiohttp does the socket work (keep-alive pool per host, llhttp's C parser). Over loopback a pool
request costs ~0.15-0.2 ms of client CPU, against ~0.4-1.1 ms through httpx's default transport (httpcore) and
~0.07-0.1 ms through the hand-written HTTP/1.1 transport this replaced (bench/RESULTS.md, "Search core").

Two adjustments to httpx-aiohttp 0.2, both in `Transport`:
- its exception map sends every aiohttp connection error to `httpx.ConnectTimeout` (the broad
  `ClientConnectionError` entry wins over the specific ones), so a refused connection or a server that hangs up
  would read as a timeout; here a connection error that is not a timeout becomes `httpx.ConnectError` (no
  connection) or `httpx.RemoteProtocolError` (the server closed it), as httpx's own transport reports them;
- the response body is read under the same mapping (its stream is wrapped), since a server can hang up
  between the head and the end of the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from typing import Any

import aiohttp
import httpx
from aiohttp.http_parser import HttpResponseParser  # the C parser (aiohttp._http_parser) where it is built
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient


class Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _connection_errors(request):
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)  # httpx-aiohttp's AiohttpResponseStream
        response.stream = _MappedStream(response.stream, request)
        return response


class _MappedStream(httpx.AsyncByteStream):
    """The response body, read under the same error mapping as the request."""

    def __init__(self, stream: httpx.AsyncByteStream, request: httpx.Request):
        self.stream, self.request = stream, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _connection_errors(self.request):
            async for chunk in self.stream:
                yield chunk

    async def aclose(self) -> None:
        with _connection_errors(self.request):
            await self.stream.aclose()


@contextlib.contextmanager
def _connection_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpx.ConnectTimeout as exc:
        cause = exc.__cause__
        if not isinstance(cause, aiohttp.ClientConnectionError) or isinstance(cause, asyncio.TimeoutError):
            raise  # a real connect timeout
        if isinstance(cause, aiohttp.ClientConnectorError):
            raise httpx.ConnectError(str(cause), request=request) from cause
        raise httpx.RemoteProtocolError(str(cause) or type(cause).__name__, request=request) from cause


class Client(HttpxAiohttpClient):
    """httpx.AsyncClient with `Transport` for direct connections and for proxies from the environment."""

    def _init_transport(self, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any):
        return transport if transport is not None else Transport(**kwargs)

    def _init_proxy_transport(self, proxy: httpx.Proxy, **kwargs: Any):
        return Transport(proxy=proxy, **kwargs)


def async_client(**kwargs: Any) -> httpx.AsyncClient:
    """An httpx.AsyncClient on aiohttp (arguments as httpx.AsyncClient's). No cap on connections unless
    `limits.max_connections` says one: the callers limit what they keep in flight."""
    limits = kwargs.pop("limits", None) or httpx.Limits(max_connections=None, keepalive_expiry=30)
    if limits.max_connections is None:  # aiohttp reads 0 as "no limit"; given None it keeps its own 100
        limits = httpx.Limits(
            max_connections=0,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        )
    return Client(limits=limits, **kwargs)


def describe() -> str:
    """What serves the requests, with versions (benchmarks record it)."""
    versions = {name: metadata.version(name) for name in ("httpx", "httpx-aiohttp", "aiohttp")}
    return (
        f"httpx {versions['httpx']} + httpx-aiohttp {versions['httpx-aiohttp']} "
        f"(aiohttp {versions['aiohttp']}, {HttpResponseParser.__module__})"
    )
