"""What a running job may touch, as a runner sees it: its request, records, events, folder, the shared clients
and its cancel flag. The job manager builds one per run (jobs/context.py's JobRun); runners know nothing of
HTTP, SQLite or other jobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from orchestrator.clients.llm import LLMPool
from orchestrator.clients.student_adapters import StudentAdapters
from orchestrator.clients.trainer import TrainerClient
from orchestrator.runners.telemetry import Telemetry
from orchestrator.settings import Settings


class StoredJob(Protocol):
    @property
    def progress(self) -> dict[str, Any]: ...


class JobRecords(Protocol):
    """The calls a runner makes on the job store (jobs/store.py's AsyncJobStore)."""

    async def get_job(self, job_id: str) -> StoredJob | None: ...

    async def update_job(self, job_id: str, *, progress: dict[str, Any] | None = None) -> Any: ...

    async def record_step(self, job_id: str, step: int, metrics: dict[str, Any]) -> None: ...

    async def steps(self, job_id: str) -> list[dict[str, Any]]: ...

    async def drop_steps_after(self, job_id: str, step: int) -> int: ...


class JobContext(Protocol):
    @property
    def job_id(self) -> str: ...
    @property
    def request(self) -> dict[str, Any]: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> JobRecords: ...
    @property
    def pool(self) -> LLMPool: ...
    @property
    def trainer(self) -> TrainerClient: ...
    @property
    def student_adapters(self) -> StudentAdapters | None:
        """The student server's adapter versions (STUDENT_URL), shared by the process's jobs; None: the trainer
        serves the student."""
        ...

    @property
    def job_dir(self) -> Path: ...
    @property
    def cancel(self) -> asyncio.Event: ...
    @property
    def telemetry(self) -> Telemetry | None: ...
    @property
    def resumed(self) -> bool: ...

    async def emit(self, type: str, **data: Any) -> None:
        """Store an event of the job and wake its followers."""
        ...

    async def set_progress(self, **progress: Any) -> None:
        """Merge into the job's progress and tell followers."""
        ...

    async def set_metrics(self, **metrics: Any) -> None: ...

    def show_live(self, name: str, snapshot: Callable[[], Any]) -> None:
        """While the run lasts, the service's /health shows `snapshot()` under `name` (e.g. the teachers)."""
        ...

    def raise_if_cancelled(self) -> None: ...

    def path(self, *parts: str) -> Path:
        """A file of the job's folder (its parent made)."""
        ...
