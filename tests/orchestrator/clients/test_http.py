"""The orchestrator's HTTP client (httpx over httpx-aiohttp) against real servers on 127.0.0.1: a tiny asyncio
server here that answers or misbehaves by path, counting connections, and a forward proxy named by the
environment. What the callers rely on: bodies decoded, connections kept alive, no cap on connections, and each
failure reported with httpx's class for it (a timeout only when something timed out)."""

import asyncio
import gzip
import json
from collections import Counter

import httpx
import pytest

from orchestrator.clients.http import async_client, describe


def reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


GZIPPED = gzip.compress(b'{"zipped": true}')
BIG = bytes(range(256)) * 8192  # 2 MiB: many socket reads
RESPONSES = {  # path -> bytes sent as they are
    "/gzip": reply(GZIPPED, f"Content-Length: {len(GZIPPED)}", "Content-Encoding: gzip"),
    "/chunked": reply(b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
    "/big": reply(BIG, f"Content-Length: {len(BIG)}"),
    "/partial": reply(b"abc", "Content-Length: 10"),  # then the server closes
    "/retry-after": reply(b"busy", "Content-Length: 4", "Retry-After: 7", status="429 Too Many Requests"),
}


class TinyServer:
    """HTTP/1.1 keep-alive on 127.0.0.1 in the test's event loop. /echo answers with what it received; /drop
    closes without an answer; /hang never answers; /gather holds every answer until `gather` requests are open
    at once; other paths send RESPONSES[path] and close after /partial."""

    def __init__(self, gather: int = 0):
        self.connections = 0
        self.requests: Counter[str] = Counter()
        self.gather, self.waiting = gather, 0
        self.all_there = asyncio.Event()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                path = httpx.URL(target).path  # origin form, or the absolute form a proxy gets
                self.requests[path] += 1
                if path == "/drop":
                    return
                if path == "/hang":
                    await reader.read()  # until the client gives up
                    return
                if path == "/gather":
                    self.waiting += 1
                    if self.waiting == self.gather:
                        self.all_there.set()
                    await self.all_there.wait()
                if path in ("/echo", "/gather"):
                    echo = {"method": method, "target": target, "headers": headers, "body": body.decode()}
                    data = json.dumps(echo).encode()
                    writer.write(
                        reply(data, f"Content-Length: {len(data)}", "Content-Type: application/json")
                    )
                else:
                    writer.write(RESPONSES[path])
                await writer.drain()
                if path == "/partial":
                    return
        finally:
            writer.close()


@pytest.fixture
async def server():
    async with TinyServer() as s:
        yield s


async def test_bodies_arrive_decoded_over_one_kept_alive_connection(server):
    async with async_client(timeout=5.0) as client:
        echoed = await client.post(
            server.url + "/echo?x=1", json={"a": 1}, headers={"Authorization": "Bearer k"}
        )
        assert echoed.status_code == 200
        sent = echoed.json()
        assert (sent["method"], sent["target"], json.loads(sent["body"])) == ("POST", "/echo?x=1", {"a": 1})
        assert sent["headers"]["authorization"] == "Bearer k"
        zipped = await client.get(server.url + "/gzip")
        assert zipped.json() == {"zipped": True}
        assert (await client.get(server.url + "/chunked")).text == "hello, world"
        assert (await client.get(server.url + "/big")).content == BIG
        busy = await client.get(server.url + "/retry-after")
        assert (busy.status_code, busy.headers["retry-after"], busy.text) == (429, "7", "busy")
    assert server.connections == 1  # every request reused the first connection


async def test_more_than_a_hundred_requests_in_flight_are_not_capped():
    """aiohttp caps a session at 100 connections by default; the callers set the limits here."""
    async with TinyServer(gather=150) as server, async_client(timeout=10.0) as client:
        answers = await asyncio.gather(
            *(client.post(server.url + "/gather", content=b"x") for _ in range(150))
        )
    assert [a.status_code for a in answers] == [200] * 150
    assert server.connections == 150


async def test_a_refused_connection_is_a_connect_error_not_a_timeout():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with async_client(timeout=5.0) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize("path", ["/drop", "/partial"])
async def test_a_server_hanging_up_is_a_transport_error_not_a_timeout(server, path):
    async with async_client(timeout=5.0) as client:
        with pytest.raises(httpx.TransportError) as raised:
            await client.get(server.url + path)
    assert not isinstance(raised.value, httpx.TimeoutException), repr(raised.value)


async def test_a_silent_server_is_a_read_timeout(server):
    async with async_client(timeout=httpx.Timeout(0.3, connect=5.0)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url + "/hang")


async def test_a_proxy_from_the_environment_carries_plain_http(server, monkeypatch):
    """A forward proxy sees the absolute URL in the request line; the tiny server plays the proxy here."""
    monkeypatch.setenv("HTTP_PROXY", server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with async_client(timeout=5.0) as client:
        echoed = (await client.post("http://teacher.invalid:8000/echo", content=b"hi")).json()
    assert echoed["target"] == "http://teacher.invalid:8000/echo"


def test_describe_names_the_library_stack():
    text = describe()
    assert text.startswith("httpx ") and "httpx-aiohttp" in text and "aiohttp" in text
