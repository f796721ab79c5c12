"""LeanHTTPTransport against real servers on 127.0.0.1: a tiny asyncio server here that misbehaves on request
(by path), and the project's scripted server through LLMPool."""

import asyncio
import gzip
import json
from collections import Counter

import httpx
import pytest
import uvicorn

from orchestrator.clients.http_transport import LeanHTTPTransport, lean_transport_for
from orchestrator.clients.llm import LLMPool
from orchestrator.clients.trainer import TrainerClient
from orchestrator.settings import EndpointSpec
from support.scripted_server import free_port, trainer_health


def reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


GZIPPED = gzip.compress(b"zipped")
HEALTH = json.dumps(trainer_health(started_at=1.0)).encode()
BIG = bytes(range(256)) * 8192  # 2 MiB: many socket reads and a write the kernel cannot take at once
RESPONSES = {  # path -> bytes sent as they are
    "/cl": reply(b"hello", "Content-Length: 5", "X-Path: cl"),
    "/health": reply(HEALTH, f"Content-Length: {len(HEALTH)}", "Content-Type: application/json"),
    "/chunked": reply(
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n", "Transfer-Encoding: chunked"
    ),
    "/close": reply(b"bye", "Content-Length: 3", "Connection: close"),
    "/eof": reply(b"until close", "Content-Type: text/plain"),  # neither length nor chunked
    "/gzip": reply(GZIPPED, f"Content-Length: {len(GZIPPED)}", "Content-Encoding: gzip"),
    "/continue": b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"ok", "Content-Length: 2"),
    "/bad-status": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "/bad-header": b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    "/partial": reply(b"abc", "Content-Length: 10"),  # then the server closes
    "/partial-head": b"HTTP/1.1 200 OK\r\nContent-Le",  # likewise
    "/slow": reply(b"slow", "Content-Length: 4"),
    "/big": reply(BIG, f"Content-Length: {len(BIG)}"),
    "/big-chunked": reply(
        b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (BIG[:1000], BIG[1000:], b"!"))
        + b"0\r\n\r\n",
        "Transfer-Encoding: chunked",
    ),
}
CLOSE_AFTER = {"/close", "/eof", "/partial", "/partial-head", "/bad-status", "/bad-header"}


class TinyServer:
    """HTTP/1.1 keep-alive on 127.0.0.1 in the test's own event loop; counts connections and requests.
    /echo answers with what it received, /size with the body's length; /stall reads no body; /hang never answers (it waits for the client to close);
    /drop closes without an answer; /drop-reused does so on any but a connection's first request;
    /chunked arrives in pieces that split a chunk header and a chunk."""

    def __init__(self):
        self.connections = self.open = self.max_open = 0
        self.requests: Counter[str] = Counter()
        self.received = asyncio.Event()  # a request arrived
        self.closed = asyncio.Event()  # a connection ended
        self.unstall = asyncio.Event()  # lets /stall handlers end

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = dict(line.split(": ", 1) for line in lines[1:] if line)
                if target == "/stall":  # reads no body: the client's write backs up
                    self.received.set()
                    await self.unstall.wait()
                    return
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                path = target.split("?")[0]
                self.requests[path] += 1
                served += 1
                self.received.set()
                if path == "/drop" or (path == "/drop-reused" and served > 1):
                    return
                if path == "/hang":
                    await reader.read()  # until the client closes
                    return
                if path == "/slow":
                    await asyncio.sleep(0.05)  # long enough for requests to overlap; nothing is timed
                if path == "/size":
                    writer.write(reply(b"%d" % len(body), f"Content-Length: {len(str(len(body)))}"))
                elif path == "/echo":
                    echo = {"method": method, "target": target, "headers": headers, "body": body.decode()}
                    data = json.dumps(echo).encode()
                    writer.write(reply(data, f"Content-Length: {len(data)}"))
                elif path == "/chunked":
                    for piece in (RESPONSES[path][:50], RESPONSES[path][50:57], RESPONSES[path][57:]):
                        writer.write(piece)
                        await writer.drain()
                        await asyncio.sleep(0.01)
                else:
                    writer.write(RESPONSES.get(path, RESPONSES["/cl"]))
                await writer.drain()
                if path in CLOSE_AFTER:
                    return
        finally:
            self.open -= 1
            writer.close()
            self.closed.set()


@pytest.fixture
async def server():
    async with TinyServer() as s:
        yield s


def client(transport: LeanHTTPTransport, **timeouts) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, **timeouts))


async def test_request_line_headers_and_body_reach_the_server(server):
    async with client(LeanHTTPTransport()) as c:
        r = await c.post(server.url + "/echo?a=1&b=x%20y", content=b'{"k":1}', headers={"X-Custom": "v"})
    sent = r.json()
    assert r.status_code == 200 and r.http_version == "HTTP/1.1"
    assert sent["method"] == "POST" and sent["target"] == "/echo?a=1&b=x%20y"
    assert sent["headers"]["Host"] == server.url.removeprefix("http://")
    assert sent["headers"]["X-Custom"] == "v" and sent["headers"]["Content-Length"] == "7"
    assert sent["body"] == '{"k":1}'


async def test_streamed_request_body_is_sent_with_a_length(server):
    async def parts():
        yield b"ab"
        yield b"cd"

    async with client(LeanHTTPTransport()) as c:
        sent = (await c.post(server.url + "/echo", content=parts())).json()
    assert sent["body"] == "abcd" and sent["headers"]["Content-Length"] == "4"
    assert "Transfer-Encoding" not in sent["headers"]


async def test_keep_alive_reuses_one_connection(server):
    async with client(LeanHTTPTransport()) as c:
        bodies = [(await c.get(server.url + "/cl")).content for _ in range(5)]
    assert bodies == [b"hello"] * 5
    assert server.connections == 1 and server.requests["/cl"] == 5


async def test_bodies_by_length_chunked_until_close_and_gzip(server):
    async with client(LeanHTTPTransport()) as c:
        cl = await c.get(server.url + "/cl")
        chunked = await c.get(server.url + "/chunked")
        gz = await c.get(server.url + "/gzip")
        interim = await c.get(server.url + "/continue")
        assert server.connections == 1  # all of those kept the connection
        eof = await c.get(server.url + "/eof")
        after = await c.get(server.url + "/cl")
    assert (cl.content, cl.headers["x-path"]) == (b"hello", "cl")
    assert chunked.content == b"hello, world"
    assert gz.content == b"zipped"
    assert (interim.status_code, interim.content) == (200, b"ok")
    assert eof.content == b"until close"
    assert after.content == b"hello" and server.connections == 2  # read-to-close ends the connection


async def test_large_bodies_both_ways(server):
    async with client(LeanHTTPTransport()) as c:
        assert (await c.post(server.url + "/size", content=BIG + BIG)).content == b"%d" % (2 * len(BIG))
        assert (await c.get(server.url + "/big")).content == BIG
        assert (await c.get(server.url + "/big-chunked")).content == BIG + b"!"
    assert server.connections == 1


async def test_connection_close_from_the_server_is_honoured(server):
    async with client(LeanHTTPTransport()) as c:
        assert (await c.get(server.url + "/close")).content == b"bye"
        assert (await c.get(server.url + "/cl")).content == b"hello"
    assert server.connections == 2


async def test_server_closing_an_idle_connection_costs_a_new_one_not_an_error(server):
    async with client(LeanHTTPTransport()) as c:
        await c.get(server.url + "/close")  # the server closes the connection after this answer
        await c.get(server.url + "/cl")
        await c.get(server.url + "/cl")
    assert server.connections == 2


async def test_stale_connection_is_retried_once_on_a_fresh_one(server):
    async with client(LeanHTTPTransport()) as c:
        assert (await c.get(server.url + "/drop-reused")).status_code == 200
        # The server drops the reused connection without an answer; the retry opens a new one.
        assert (await c.get(server.url + "/drop-reused")).content == b"hello"
    assert server.requests["/drop-reused"] == 3 and server.connections == 2


async def test_stale_retry_happens_only_once(server):
    async with client(LeanHTTPTransport()) as c:
        await c.get(server.url + "/cl")
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(server.url + "/drop")  # reused: dropped, retried on a fresh one, dropped again
    assert server.requests["/drop"] == 2


async def test_fresh_connection_without_an_answer_is_not_retried(server):
    async with client(LeanHTTPTransport()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(server.url + "/drop")
    assert server.requests["/drop"] == 1


@pytest.mark.parametrize("path", ["/partial", "/partial-head"])  # 3 of 10 body bytes; half a head
async def test_no_retry_after_part_of_the_response_arrived(server, path):
    async with client(LeanHTTPTransport()) as c:
        await c.get(server.url + "/cl")
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(server.url + path)  # on the reused connection, then the server closes it
    assert server.requests[path] == 1


@pytest.mark.parametrize("path", ["/bad-status", "/bad-header"])
async def test_malformed_responses_are_protocol_errors(server, path):
    async with client(LeanHTTPTransport()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(server.url + path)
        assert (await c.get(server.url + "/cl")).content == b"hello"
    assert server.connections == 2


async def test_read_timeout_closes_the_connection(server):
    async with client(LeanHTTPTransport(), read=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.get(server.url + "/hang")
        await asyncio.wait_for(server.closed.wait(), 10)  # the server sees the client hang up
        assert (await c.get(server.url + "/cl")).content == b"hello"
    assert server.connections == 2


async def test_write_timeout_when_the_server_reads_nothing(server):
    async with client(LeanHTTPTransport(), write=0.2) as c:
        with pytest.raises(httpx.WriteTimeout):
            await c.post(server.url + "/stall", content=BIG * 32)  # 64 MiB, more than socket buffers hold
    server.unstall.set()


async def test_connect_error_on_a_closed_port():
    async with client(LeanHTTPTransport()) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{free_port()}/cl")


async def test_cancellation_closes_the_connection_it_used(server):
    async with client(LeanHTTPTransport()) as c:
        await c.get(server.url + "/cl")
        server.received.clear()
        task = asyncio.create_task(c.get(server.url + "/hang"))  # reuses the idle connection
        await server.received.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 10)  # closed, not pooled
        assert server.open == 0
        assert (await c.get(server.url + "/cl")).content == b"hello"
    assert server.connections == 2


async def test_pool_cap_is_respected_and_waiters_reuse_connections(server):
    async with client(LeanHTTPTransport(max_connections=2)) as c:
        responses = await asyncio.gather(*(c.get(server.url + "/slow") for _ in range(6)))
    assert [r.content for r in responses] == [b"slow"] * 6
    assert server.connections == 2 and server.max_open == 2


async def test_pool_timeout_when_the_cap_is_held(server):
    async with client(LeanHTTPTransport(max_connections=1), pool=0.1) as c:
        hanging = asyncio.create_task(c.get(server.url + "/hang"))
        await server.received.wait()
        with pytest.raises(httpx.PoolTimeout):
            await c.get(server.url + "/cl")
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
        assert (await c.get(server.url + "/cl")).content == b"hello"  # the cap is free again


async def test_aclose_closes_idle_connections(server):
    transport = LeanHTTPTransport()
    async with client(transport) as c:
        await c.get(server.url + "/cl")
        assert server.open == 1
    await asyncio.wait_for(server.closed.wait(), 10)
    assert server.open == 0


async def test_header_with_a_line_break_is_refused(server):
    async with client(LeanHTTPTransport()) as c:
        with pytest.raises(httpx.LocalProtocolError):
            await c.get(server.url + "/cl", headers={"X-Evil": "a\r\nX-Injected: 1"})
    assert server.requests["/cl"] == 0


async def streaming_app(scope, receive, send):
    """An ASGI app whose answer has no length: uvicorn sends it chunked, as vLLM's streaming routes do."""
    if scope["type"] != "http":
        return
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for part in (b"got ", body, b"!"):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def test_uvicorn_chunked_answers_over_one_connection():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(streaming_app, host="127.0.0.1", port=port, log_level="error"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with client(LeanHTTPTransport()) as c:
            for i in range(3):
                r = await c.post(f"http://127.0.0.1:{port}/", content=b"%d" % i)
                assert r.headers["transfer-encoding"] == "chunked" and r.content == b"got %d!" % i
            assert len(server.server_state.connections) == 1  # kept alive and reused
    finally:
        server.should_exit = True
        await serving


def _endpoint(base_url: str) -> EndpointSpec:
    return EndpointSpec(name="t", base_url=base_url, model="student", timeout_s=5.0)


async def test_pool_sends_plain_http_through_the_lean_transport(scripted_server):
    async with LLMPool() as pool:
        for _ in range(3):
            completion = await pool.chat(_endpoint(scripted_server.v1), [{"role": "user", "content": "q"}])
            assert completion.choices[0].text
        shard = pool._servers[scripted_server.v1.rstrip("/")].shards[0]
        assert isinstance(shard.transport, LeanHTTPTransport)
    assert scripted_server.connections == 1


@pytest.mark.parametrize(
    "base_url, proxy, lean_http",
    [
        ("https://api.example.invalid/v1", None, True),  # https stays on httpcore
        ("http://10.9.8.7:8000/v1", "http://127.0.0.1:3128", True),  # so does a proxied server
        ("http://10.9.8.7:8000/v1", None, False),  # and everything when the pool is told so
    ],
)
async def test_https_proxies_and_opt_out_use_httpcore(monkeypatch, base_url, proxy, lean_http):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    async with LLMPool(lean_http=lean_http) as pool:
        shard = pool._acquire_shard(_endpoint(base_url))
        assert isinstance(shard.transport, httpx.AsyncHTTPTransport)
        shard.release()


def _clear_proxies(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.mark.parametrize(
    "base_url, proxy, lean",
    [
        ("http://127.0.0.1:8001", None, True),
        ("https://trainer.example.invalid", None, False),
        ("http://10.9.8.7:8001", "http://127.0.0.1:3128", False),
    ],
)
def test_lean_transport_only_for_plain_http_without_a_proxy(monkeypatch, base_url, proxy, lean):
    _clear_proxies(monkeypatch)
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    assert isinstance(lean_transport_for(base_url), LeanHTTPTransport) is lean


async def test_trainer_client_talks_to_a_real_server_through_the_lean_transport(monkeypatch, server):
    """The trainer client's calls (health here; /logprobs and /grpo/step alike) reuse one kept-alive connection."""
    _clear_proxies(monkeypatch)
    async with TrainerClient(server.url) as client:
        assert isinstance(client._client._transport, LeanHTTPTransport)
        assert [(await client.health()).status for _ in range(3)] == ["ok"] * 3
    assert server.connections == 1
