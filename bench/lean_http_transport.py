"""A lean httpx transport for plain-http servers: HTTP/1.1 keep-alive over asyncio streams.

Why it exists. Over real loopback sockets a pool request cost ~400 us of client CPU through httpx's default
transport (httpcore + anyio + h11: cancel scopes and checkpoints, h11's state machine and header validation,
a scan of the idle connections), while a raw asyncio-streams HTTP/1.1 keep-alive exchange of the same request
cost < 90 us, server included (measured 2026-11-25 05:56 UTC). The search sends thousands of small JSON
requests to servers on the same host or network (vLLM, the trainer), so that client cost bounded its rate.

What it does. `LeanHTTPTransport` speaks just the HTTP/1.1 the pool needs: one request with a known body
(Content-Length), one response read whole (Content-Length, chunked, or until close), keep-alive connections
pooled per (host, port). It keeps httpx's Request/Response objects and exceptions, so callers keep their
error handling. It serves `http://` only; https and proxies stay on httpx's default transport (the pool
chooses, see orchestrator/clients/llm.py).
"""

from __future__ import annotations

import asyncio
import time

import httpx

MAX_HEAD_BYTES = 64 * 1024  # status line + headers; a server sending more is not one we talk to
READ_SIZE = 64 * 1024


def lean_transport_for(base_url: str, **options) -> LeanHTTPTransport | None:
    """A lean transport for a client of `base_url` when that is plain http with no proxy from the environment
    covering it, else None (httpx's default transport). The check comes first because httpx ignores the
    environment's proxies once a client is handed its own transport."""
    url = httpx.URL(base_url)
    if url.scheme != "http":
        return None
    with httpx.Client(verify=False) as probe:  # sends nothing; verify=False spares loading a CA bundle
        if probe._transport_for_url(url) is not probe._transport:
            return None
    return LeanHTTPTransport(**options)


class LeanHTTPTransport(httpx.AsyncBaseTransport):
    """`max_connections` caps the open connections per (host, port) (None = no cap; more requests wait, up
    to the pool timeout); `max_idle` is how many idle ones each keeps; idle ones older than
    `idle_expiry_s` are closed instead of reused (servers drop idle keep-alive connections after a while)."""

    def __init__(self, max_connections: int | None = None, max_idle: int = 8, idle_expiry_s: float = 30.0):
        self.max_connections, self.max_idle, self.idle_expiry_s = max_connections, max_idle, idle_expiry_s
        self._hosts: dict[tuple[str, int], _HostPool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"LeanHTTPTransport serves http:// only, not {url.scheme}://")
        key = (url.host, url.port or 80)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _HostPool(key, self)
        timeout = request.extensions.get("timeout") or {}
        head = _request_head(request, await _request_body(request))
        # A connection taken from the idle pool may have been closed by the server while it sat there; that
        # shows as EOF or a reset before any response byte, and the request most likely never reached the
        # server's application. Retry once on a fresh connection then (httpcore does the same), never
        # after response bytes arrived (the server may have acted on the request).
        conn = await host.acquire(timeout)
        try:
            try:
                return await conn.exchange(request, head, timeout)
            except _StaleConnection:
                host.release(conn, reusable=False)
                conn = None
                conn = await host.acquire(timeout, fresh=True)
                return await conn.exchange(request, head, timeout)  # a fresh one is never stale
        finally:
            # Every way out but a complete exchange (an error, a timeout, the caller's cancellation) leaves
            # the connection mid-exchange: `reusable` is False then, and it is closed rather than pooled.
            if conn is not None:
                host.release(conn, reusable=conn.reusable)

    async def aclose(self) -> None:
        hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close_all()


class _StaleConnection(Exception):
    """A reused connection gave EOF or a reset before any response byte."""


class _HostPool:
    """The connections of one (host, port): a stack of idle ones (the warmest on top), a count of open ones
    against the cap, and the requests waiting for the cap."""

    def __init__(self, key: tuple[str, int], transport: LeanHTTPTransport):
        self.key, self.transport = key, transport
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: list[asyncio.Future] = []
        self.connections: set[_Connection] = set()  # open ones, for aclose

    async def acquire(self, timeout: dict, fresh: bool = False) -> _Connection:
        now = time.monotonic()
        while not fresh and self.idle:
            conn = self.idle.pop()
            # The event loop has already seen any EOF the server sent while the connection was idle.
            if conn.usable and now - conn.idle_since < self.transport.idle_expiry_s:
                conn.reused = True
                return conn
            self._discard(conn)
        cap = self.transport.max_connections
        if cap is not None and self.open >= cap:
            await self._wait_for_room(cap, timeout.get("pool"))
            if self.open >= cap:  # woken by a connection going idle
                if not fresh:
                    return await self.acquire(timeout)
                # The retry of a stale connection needs a new socket: make room by dropping the coldest.
                self._discard(self.idle.pop(0))
        self.open += 1
        try:
            conn = await _Connection.open(self, timeout.get("connect"))
        except BaseException:
            self.open -= 1
            self._wake()
            raise
        self.connections.add(conn)
        return conn

    async def _wait_for_room(self, cap: int, pool_timeout: float | None) -> None:
        try:
            async with asyncio.timeout(pool_timeout):
                while self.open >= cap and not self.idle:
                    waiter = asyncio.get_running_loop().create_future()
                    self.waiters.append(waiter)
                    try:
                        await waiter
                    finally:
                        if waiter in self.waiters:
                            self.waiters.remove(waiter)
        except BaseException as exc:
            self._wake()  # we may have been woken and then cancelled or timed out: pass the room on
            if isinstance(exc, TimeoutError):
                name, port = self.key
                raise httpx.PoolTimeout(f"no connection to {name}:{port} free in time") from None
            raise

    def release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and conn.usable and len(self.idle) < self.transport.max_idle:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            self._discard(conn)
        self._wake()

    def _discard(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.open -= 1
        conn.close()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()
        self.idle.clear()
        self.open = 0


class _Connection:
    """One keep-alive socket. `reusable` is True only between complete exchanges."""

    def __init__(self, host: _HostPool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.host, self.reader, self.writer = host, reader, writer
        self.reused, self.reusable = False, False
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current response yet (after one, never retry)
        # Bytes read but not parsed yet; a bytearray, so appending a large body read in pieces stays linear.
        self.buffer = bytearray()

    @classmethod
    async def open(cls, host: _HostPool, connect_timeout: float | None) -> _Connection:
        name, port = host.key
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(name, port, limit=READ_SIZE)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {name}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {name}:{port}: {exc}") from exc
        return cls(host, reader, writer)

    @property
    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing() or self.buffer)

    def close(self) -> None:
        self.reusable = False
        self.writer.close()  # no wait for the close handshake: nothing here needs it

    async def exchange(self, request: httpx.Request, head: bytes, timeout: dict) -> httpx.Response:
        self.reusable, self.got_bytes = False, False
        self.writer.write(head)
        if self.writer.transport.get_write_buffer_size():  # the kernel did not take it all at once
            try:
                async with asyncio.timeout(timeout.get("write")):
                    await self.writer.drain()
            except TimeoutError:
                raise httpx.WriteTimeout("writing the request timed out") from None
            except OSError as exc:
                if self.reused:
                    raise _StaleConnection from exc
                raise httpx.WriteError(f"writing the request failed: {exc}") from exc
        read_timeout = timeout.get("read")
        status, reason, version, headers = await self._read_head(read_timeout)
        while 100 <= status < 200:  # an interim response (100 Continue, 103 Early Hints): the answer follows
            status, reason, version, headers = await self._read_head(read_timeout)
        names = {name.lower(): value for name, value in headers}
        keep_alive = version == b"HTTP/1.1" and b"close" not in names.get(b"connection", b"").lower()
        if request.method == "HEAD" or status in (204, 304):
            body = b""
        elif b"chunked" in names.get(b"transfer-encoding", b"").lower():
            body = await self._read_chunked(read_timeout)
        elif b"content-length" in names:
            body = await self._read_exactly(_content_length(headers), read_timeout)
        else:
            body, keep_alive = await self._read_to_close(read_timeout), False
        self.reusable = keep_alive
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(body),  # the caller's `aread()` decodes gzip/deflate, as with httpcore
            request=request,
            extensions={"http_version": version, "reason_phrase": reason},
        )

    async def _recv(self, read_timeout: float | None) -> bytes:
        """The next bytes from the socket, b"" at EOF. Each call is one read under the read timeout, as
        httpcore's read timeout is per read, not for the whole response."""
        try:
            async with asyncio.timeout(read_timeout):
                return await self.reader.read(READ_SIZE)
        except TimeoutError:
            raise httpx.ReadTimeout("reading the response timed out") from None
        except OSError as exc:
            if self.reused and not self.got_bytes:
                raise _StaleConnection from exc
            raise httpx.ReadError(f"reading the response failed: {exc}") from exc

    async def _read_head(self, read_timeout: float | None) -> tuple[int, bytes, bytes, list]:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("response headers too large")
            data = await self._recv(read_timeout)
            if not data:
                if self.reused and not self.got_bytes:
                    raise _StaleConnection
                raise httpx.RemoteProtocolError("server disconnected before a complete response head")
            self.got_bytes = True
            self.buffer += data
        lines = self._take(end, 4).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not _is_status(parts[1]):
            raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
            headers.append((name, value.strip()))
        return int(parts[1]), parts[2] if len(parts) > 2 else b"", parts[0], headers

    async def _read_exactly(self, size: int, read_timeout: float | None) -> bytes:
        while len(self.buffer) < size:
            data = await self._recv(read_timeout)
            if not data:
                raise httpx.RemoteProtocolError("server disconnected before the end of the response body")
            self.buffer += data
        return self._take(size)

    async def _read_line(self, read_timeout: float | None) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("chunk header too long")
            data = await self._recv(read_timeout)
            if not data:
                raise httpx.RemoteProtocolError("server disconnected inside a chunked body")
            self.buffer += data
        return self._take(end, 2)

    async def _read_chunked(self, read_timeout: float | None) -> bytes:
        chunks = []
        while True:
            size_text = (await self._read_line(read_timeout)).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"malformed chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise httpx.RemoteProtocolError(f"malformed chunk size {size_text[:20]!r}")
            if size == 0:
                while await self._read_line(read_timeout):  # trailers, up to the empty line
                    pass
                return b"".join(chunks)
            chunks.append(await self._read_exactly(size, read_timeout))
            if await self._read_line(read_timeout):
                raise httpx.RemoteProtocolError("chunk data longer than its size")

    async def _read_to_close(self, read_timeout: float | None) -> bytes:
        while data := await self._recv(read_timeout):
            self.buffer += data
        return self._take(len(self.buffer))

    def _take(self, size: int, separator: int = 0) -> bytes:
        """The first `size` buffered bytes, dropping them and the `separator` bytes after them."""
        data = bytes(self.buffer[:size])
        del self.buffer[: size + separator]
        return data


async def _request_body(request: httpx.Request) -> bytes:
    try:
        return request.content  # the pool marks its bodies as read
    except httpx.RequestNotRead:
        return await request.aread()


def _request_head(request: httpx.Request, body: bytes) -> bytes:
    """Request line, headers and body as one write. httpx.Request has already set Host and, for `content=`,
    Content-Length. We never send chunked: a streamed body has been read whole, so its Transfer-Encoding
    header gives way to a Content-Length."""
    raw = [(name, value) for name, value in request.headers.raw if name.lower() != b"transfer-encoding"]
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    lines += [b"%s: %s" % pair for pair in raw]
    if not any(name.lower() == b"host" for name, _ in raw):
        lines.append(b"Host: " + request.url.netloc)
    if body and not any(name.lower() == b"content-length" for name, _ in raw):
        lines.append(b"Content-Length: %d" % len(body))
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    # A CR or LF inside a header would split it into a second header (or request): refuse, as h11 does.
    if head.count(b"\n") != len(lines) + 1 or head.count(b"\r") != len(lines) + 1:
        raise httpx.LocalProtocolError("CR or LF in a request header")
    return head + body


def _is_status(text: bytes) -> bool:
    return len(text) == 3 and text.isdigit()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    values = {value for name, value in headers if name.lower() == b"content-length"}
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise httpx.RemoteProtocolError("malformed Content-Length")
    return int(value)
