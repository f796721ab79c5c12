"""A small synchronous REST client of the orchestrator, for the CLI, the demo and tests.

`follow` reads a job's server-sent events and reconnects with the last event id if the stream breaks (for
example while the orchestrator restarts), so a caller sees every event exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, overload

import httpx


@dataclass
class Event:
    id: int
    type: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from text/event-stream lines (comments and keep-alives skipped)."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield Event(
                    id=int(fields.get("id", 0) or 0),
                    type=fields.get("event", "message"),
                    data=json.loads(fields["data"]),
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value


class OrchestratorError(Exception):
    pass


class OrchestratorClient:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 60.0
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OrchestratorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise OrchestratorError(
                f"{response.request.method} {response.request.url.path}: "
                f"HTTP {response.status_code} {response.text[:500]}"
            )
        return response.json()

    def health(self) -> dict:
        return self._json(self.http.get("/health"))

    def train(self, **request: Any) -> str:
        return self._json(self.http.post("/train", json=request))["job_id"]

    def eval(self, **request: Any) -> str:
        return self._json(self.http.post("/eval", json=request))["job_id"]

    def job(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/jobs/{job_id}"))

    def jobs(self) -> list[dict]:
        return self._json(self.http.get("/jobs"))["jobs"]

    def steps(self, job_id: str) -> list[dict]:
        return self._json(self.http.get(f"/jobs/{job_id}/steps"))["steps"]

    def cancel(self, job_id: str) -> dict:
        return self._json(self.http.post(f"/jobs/{job_id}/cancel"))

    def resume(self, job_id: str) -> dict:
        return self._json(self.http.post(f"/jobs/{job_id}/resume"))

    def results(self, job_id: str) -> list[dict]:
        response = self.http.get(f"/jobs/{job_id}/results.jsonl")
        if response.status_code >= 400:
            raise OrchestratorError(f"results of {job_id}: HTTP {response.status_code}")
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    @overload
    def tree(self, job_id: str, n: int, format: Literal["json"] = "json") -> dict: ...
    @overload
    def tree(self, job_id: str, n: int, format: Literal["svg"]) -> str: ...
    def tree(self, job_id: str, n: int, format: Literal["json", "svg"] = "json") -> dict | str:
        response = self.http.get(f"/jobs/{job_id}/trees/{n}", params={"format": format})
        if response.status_code >= 400:
            raise OrchestratorError(f"tree {n} of {job_id}: HTTP {response.status_code}")
        return response.json() if format == "json" else response.text

    def follow(
        self, job_id: str, after: int = 0, reconnect_s: float = 1.0, give_up_s: float = 120.0
    ) -> Iterator[Event]:
        """Every event of the job after `after`, until the job has finished (or was interrupted)."""
        last = after
        down_since: float | None = None
        while True:
            try:
                with self.http.stream(
                    "GET",
                    f"/jobs/{job_id}/events",
                    params={"after": last},
                    timeout=httpx.Timeout(60.0, read=None),
                ) as response:
                    if response.status_code >= 400:
                        raise OrchestratorError(f"events of {job_id}: HTTP {response.status_code}")
                    down_since = None
                    for event in parse_sse(response.iter_lines()):
                        last = event.id
                        yield event
                job = self.job(job_id)
                if job["status"] not in ("queued", "running"):
                    return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > give_up_s:
                    raise
            time.sleep(reconnect_s)

    def wait(self, job_id: str, timeout_s: float = 3600.0, poll_s: float = 1.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["status"] not in ("queued", "running"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:g}s")
            time.sleep(poll_s)
