"""An ASGI middleware that refuses request bodies over a size limit with 413, shared by both services.

A declared Content-Length over the limit is refused before the body is read. Bodies without one (chunked
transfer) are counted as they stream in, and the read stops at the first byte over the limit, so a client
cannot make the server buffer more than `max_bytes` either way.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


def too_large_message(max_bytes: int, setting: str) -> str:
    return f"request body exceeds the limit of {max_bytes} bytes ({setting})"


class BodySizeLimit:
    def __init__(self, app, max_bytes: int, setting: str = "max_request_bytes"):
        self.app, self.max_bytes, self.setting = app, max_bytes, setting

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = too_large_message(self.max_bytes, self.setting)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _respond(send, 400, "invalid Content-Length header")
            if int(declared) > self.max_bytes:
                return await _respond(send, 413, message)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body, so the route's own
                    # exception handling turns it into the 413; the except below covers plain Starlette.
                    raise HTTPException(413, message)
            return event

        async def tracked_send(event):
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await _respond(send, 413, message)


async def _respond(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
