"""Hold a service under a fixed number of concurrent clients for a bounded time and count what became of every
request: answered, refused with 429 (and whether it said Retry-After), another status, or a transport error (a
reset or dropped connection, a timeout). Meanwhile /health is asked every half second on a connection of its own.

    report = asyncio.run(hold_load(url, "/v1/chat/completions", body, concurrency=512, seconds=20))
    report.dropped == 0 and report.health_failures == 0

Each client sends its next request as soon as it has an answer; after a 429 it waits Retry-After (capped at 2 s),
as a polite client does. Used by tests/integration/test_load_trainer.py and bench/reliability_bench.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadReport:
    concurrency: int
    seconds: float
    answered: int = 0
    refused: int = 0  # 429
    refused_without_retry_after: int = 0
    other_statuses: Counter = field(default_factory=Counter)
    transport_errors: Counter = field(
        default_factory=Counter
    )  # by exception type: ReadError, RemoteProtocolError
    health_polls: int = 0
    health_failures: int = 0
    health_max_s: float = 0.0

    @property
    def dropped(self) -> int:
        """Requests that got no HTTP answer at all (reset, closed, timed out)."""
        return sum(self.transport_errors.values())

    def as_dict(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "answered": self.answered,
            "refused_429": self.refused,
            "refused_429_without_retry_after": self.refused_without_retry_after,
            "other_statuses": dict(self.other_statuses),
            "dropped": self.dropped,
            "transport_errors": dict(self.transport_errors),
            "health_polls": self.health_polls,
            "health_failures": self.health_failures,
            "health_max_s": round(self.health_max_s, 3),
        }


async def hold_load(
    url: str,
    path: str,
    body: dict,
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    timeout_s: float = 300.0,
) -> LoadReport:
    report = LoadReport(concurrency=concurrency, seconds=seconds)
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as client:

        async def one_client() -> None:
            while time.monotonic() < deadline:
                try:
                    response = await client.post(path, json=body)
                except httpx.TransportError as exc:
                    report.transport_errors[type(exc).__name__] += 1
                    continue
                if response.status_code == 200:
                    report.answered += 1
                elif response.status_code == 429:
                    report.refused += 1
                    retry_after = response.headers.get("retry-after")
                    if retry_after is None:
                        report.refused_without_retry_after += 1
                    await asyncio.sleep(min(float(retry_after or 1), 2.0))
                else:
                    report.other_statuses[response.status_code] += 1

        poller = threading.Thread(target=poll_health, args=(url, deadline, report), daemon=True)
        poller.start()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        await asyncio.to_thread(poller.join)
    return report


def poll_health(url: str, deadline: float, report: LoadReport) -> None:
    """GET /health every half second until the deadline, from a thread of its own (not behind the clients' event
    loop, which is busy with hundreds of requests)."""
    with httpx.Client(base_url=url, timeout=30) as health:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                ok = health.get("/health").status_code == 200
            except httpx.TransportError:
                ok = False
            report.health_polls += 1
            report.health_failures += not ok
            report.health_max_s = max(report.health_max_s, time.monotonic() - started)
            time.sleep(0.5)
