"""What a running job may touch: its record, events, folder, the shared clients and its cancel flag.

The job manager builds one `JobContext` per run and hands it to the training or evaluation loop, which knows
nothing of HTTP or of other jobs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.events import EventHub
from orchestrator.llm import LLMPool
from orchestrator.settings import Settings
from orchestrator.store import AsyncJobStore
from orchestrator.telemetry import Telemetry
from orchestrator.trainer_client import TrainerClient


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is set."""


@dataclass
class JobContext:
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

    async def emit(self, type: str, **data: Any) -> None:
        await self.hub.publish(self.job_id, type, data)

    async def set_progress(self, **progress: Any) -> None:
        """Merge into the job's progress and tell followers."""
        await self.store.update_job(self.job_id, progress=progress)
        await self.emit("progress", **progress)

    async def set_metrics(self, **metrics: Any) -> None:
        await self.store.update_job(self.job_id, metrics=metrics)

    def raise_if_cancelled(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled(self.job_id)

    def path(self, *parts: str) -> Path:
        target = self.job_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
