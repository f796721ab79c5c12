"""One run of a job: what its runner may touch (runners/context.py's JobContext), built by the job manager."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.clients.llm import LLMPool
from orchestrator.clients.student_adapters import StudentAdapters
from orchestrator.clients.trainer import TrainerClient
from orchestrator.jobs.events import EventHub
from orchestrator.jobs.store import AsyncJobStore
from orchestrator.runners.telemetry import Telemetry
from orchestrator.settings import Settings


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is set."""


@dataclass
class JobRun:
    job_id: str
    request: dict[str, Any]
    settings: Settings
    store: AsyncJobStore
    hub: EventHub
    pool: LLMPool
    trainer: TrainerClient
    job_dir: Path
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    telemetry: Telemetry | None = None
    resumed: bool = False
    live: dict[str, Callable[[], Any]] = field(default_factory=dict)  # what /health shows of the running job
    student_adapters: StudentAdapters | None = None

    async def emit(self, type: str, **data: Any) -> None:
        await self.hub.publish(self.job_id, type, data)

    async def set_progress(self, **progress: Any) -> None:
        """Merge into the job's progress and tell followers."""
        await self.store.update_job(self.job_id, progress=progress)
        await self.emit("progress", **progress)

    def show_live(self, name: str, snapshot: Callable[[], Any]) -> None:
        self.live[name] = snapshot

    async def set_metrics(self, **metrics: Any) -> None:
        await self.store.update_job(self.job_id, metrics=metrics)

    def raise_if_cancelled(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled(self.job_id)

    def path(self, *parts: str) -> Path:
        target = self.job_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
