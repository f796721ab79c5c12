"""An ASGI middleware that tells the truth about which methods a path allows, shared by both services.

Starlette routes each (path, method) pair on its own, so a wrong method meets the first route of that path and
its 405 lists only that route's methods (POST /checkpoints answered `Allow: POST` for a path that GET also
serves), and OPTIONS is a 405 as well. Here:
    OPTIONS <path>   -> 204 with `Allow:` every method the routes of that path take (404 as before for a path
                        no route has); no token needed, nothing else runs
    a 405            -> its `Allow:` header rewritten to the same complete list
The methods come from the app's OpenAPI schema (what it promises), plus its undocumented plain routes (/docs,
/openapi.json).
"""

from __future__ import annotations

import functools
import re

from starlette.routing import Match, Route


@functools.lru_cache(maxsize=256)
def _template(path: str) -> re.Pattern[str]:
    """An OpenAPI path template as a pattern: /jobs/{job_id} matches /jobs/<one segment>."""
    parts = re.split(r"(\{[^/{}]+\})", path)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def allowed_methods(scope) -> list[str]:
    """Every method the app serves at the request's path, plus OPTIONS (and HEAD beside GET); [] when it serves
    nothing there."""
    app, path = scope["app"], scope["path"]
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if _template(template).fullmatch(path):
            methods |= {m.upper() for m in operations}
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods | {"OPTIONS"}) if methods else []


class AllowedMethods:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS" and (methods := allowed_methods(scope)):
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [(b"allow", ", ".join(methods).encode())],
                }
            )
            return await send({"type": "http.response.body", "body": b""})

        async def complete_allow(message):
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = ", ".join(allowed_methods(scope)).encode()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", methods)]}
            await send(message)

        await self.app(scope, receive, complete_allow)
