"""A job's student server (STUDENT_URL): the trainer's current adapter version published to it, and the job kept
going while it is away.

    server = StudentServer(adapters, settings.student_wait_s, ctx.emit)
    await server.publish_trainer_version(await watch.health())      # job start, after a checkpoint load or rewind
    await server.publish(step.adapter_version, step.adapter_path)    # after every applied step
    if searched.student_unavailable:                                 # requests failed: the server went away
        await server.recover()                                       # then the step's batch is searched again

A refusal fails the job at once with the server's reason (AdapterLoadRefused: the server cannot read the path,
e.g. STUDENT_ADAPTER_DIR does not match its mount, or the adapter does not fit its flags); a trainer that exports
no adapters fails it too (NoAdapterExport). A server that does not answer is waited for, at most STUDENT_WAIT_S
per outage ("student_server_unavailable", then "student_server_back"), and one that restarted meanwhile, having
forgotten its adapters, gets the current version loaded again (StudentAdapters.restore). Nothing is lost: a step
is published after it was applied, however long that takes, and a spoiled search is done again before its step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from orchestrator.clients.student_adapters import (
    StudentAdapters,
    StudentServerError,
    StudentServerUnreachable,
)
from services.protocol import HealthResponse


class NoAdapterExport(StudentServerError):
    """STUDENT_URL is set but the trainer writes no adapter directories for the server to load."""

    def __init__(self) -> None:
        super().__init__(
            "STUDENT_URL is set but the trainer exports no adapters (its adapter_path is null): set "
            "TRAINER_ADAPTER_EXPORT_DIR on the trainer to a folder the student server can read"
        )


class StudentServer:
    def __init__(
        self,
        adapters: StudentAdapters,
        wait_s: float,
        emit: Callable[..., Awaitable[None]],
        poll_s: float = 2.0,
    ):
        self.adapters, self.wait_s, self.emit, self.poll_s = adapters, wait_s, emit, poll_s
        self.published: list[int] = []  # versions made current during this run, in order (repeats once)

    async def publish_trainer_version(self, health: HealthResponse) -> None:
        """Make the version the trainer holds now the current one (its /health says which, and where)."""
        await self.publish(health.adapter_version, health.adapter_path)

    async def publish(self, version: int, path: str | None) -> None:
        """Load `version` from the trainer's `path` and make it current, waiting for an unreachable server."""
        if path is None:
            raise NoAdapterExport()
        while True:
            try:
                await self.adapters.publish(version, path)
                break
            except StudentServerUnreachable as exc:
                await self._wait(str(exc))
        if not self.published or self.published[-1] != version:
            self.published.append(version)

    async def recover(self) -> None:
        """After a search whose student requests the server could not serve: wait until it answers, with the
        current version loaded (again, after a restart)."""
        await self._wait("student requests failed during the search")

    async def _wait(self, problem: str) -> None:
        """Until `restore` succeeds (the server answers and serves the current version); StudentServerUnreachable
        after STUDENT_WAIT_S. AdapterLoadRefused (a restarted server that will not load it) is raised at once."""
        started = time.monotonic()
        told = False
        while True:
            try:
                await self.adapters.restore()
            except StudentServerUnreachable as exc:
                problem = str(exc)
            else:
                if told:
                    await self.emit("student_server_back", waited_s=round(time.monotonic() - started, 1))
                return
            if not told:
                await self.emit("student_server_unavailable", error=problem[:300], wait_s=self.wait_s)
                told = True
            if time.monotonic() - started > self.wait_s:
                raise StudentServerUnreachable(
                    f"the student server was not reachable for {self.wait_s:g} s (STUDENT_WAIT_S); last error: "
                    f"{problem[:300]}"
                )
            await asyncio.sleep(self.poll_s)
