"""What the routes take from the app (its settings, job manager, telemetry, open event streams), the bearer
auth of every route but /health, and the lookup of a job by id."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from orchestrator.jobs.manager import JobManager, JobNotFound
from orchestrator.jobs.store import JobRecord
from orchestrator.runners.telemetry import Telemetry
from orchestrator.settings import Settings

# Every dependency is `async def`: FastAPI runs a plain `def` one in its thread pool, a hand-off to a worker thread
# and back on every request (the trainer measured it at ~7% of its event loop's GIL time, issue #20).


class StreamCount:
    """Event streams open now (each holds a connection and a follower of a job's events)."""

    def __init__(self) -> None:
        self.open = 0


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_manager(request: Request) -> JobManager:
    return request.app.state.manager


async def get_telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry


async def get_streams(request: Request) -> StreamCount:
    return request.app.state.streams


SettingsDep = Annotated[Settings, Depends(get_settings)]
ManagerDep = Annotated[JobManager, Depends(get_manager)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
StreamsDep = Annotated[StreamCount, Depends(get_streams)]


async def require_token(settings: SettingsDep, authorization: str | None = Header(default=None)) -> None:
    """With API_TOKEN set, `Authorization: Bearer <token>` or 401."""
    if settings.api_token is None:
        return
    token = settings.api_token.get_secret_value()
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def existing_job(manager: JobManager, job_id: str) -> JobRecord:
    """The job, or 404."""
    try:
        return await manager.get(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id!r}") from None
