"""Job events: stored first, then announced, so a stream can always be replayed from the store.

`EventHub.publish` appends an event to the store and wakes every follower of that job. `EventHub.follow`
yields the stored events after a given sequence number and waits for more until the job has finished; the
SSE route turns them into `text/event-stream` frames with `sse_frame`. Reading from the store each time
(instead of passing events through queues) means a reconnecting client with Last-Event-ID loses nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from orchestrator.store import AsyncJobStore, EventRecord

KEEPALIVE_S = 15.0


class EventHub:
    def __init__(self, store: AsyncJobStore):
        self.store = store
        self._wakeups: dict[str, asyncio.Condition] = {}

    def _condition(self, job_id: str) -> asyncio.Condition:
        if job_id not in self._wakeups:
            self._wakeups[job_id] = asyncio.Condition()
        return self._wakeups[job_id]

    async def publish(self, job_id: str, type: str, data: dict[str, Any]) -> EventRecord:
        event = await self.store.append_event(job_id, type, data)
        await self.notify(job_id)
        return event

    async def notify(self, job_id: str) -> None:
        """Wake the followers of a job (after an event was stored by other means)."""
        condition = self._condition(job_id)
        async with condition:
            condition.notify_all()

    async def follow(
        self, job_id: str, after_seq: int = 0, keepalive_s: float = KEEPALIVE_S
    ) -> AsyncIterator[EventRecord | None]:
        """Stored events after `after_seq`, then new ones as they come; ends once the job has finished and
        every event is out. Yields None after `keepalive_s` without news (the caller sends a keep-alive)."""
        condition = self._condition(job_id)
        last = after_seq
        while True:
            timed_out = False
            async with condition:
                events = await self.store.events_after(job_id, last)
                if not events:
                    job = await self.store.get_job(job_id)
                    if job is None:
                        return
                    if job.finished or job.status == "interrupted":
                        # The final status event is committed with the status: read once more, then stop.
                        events = await self.store.events_after(job_id, last)
                        if not events:
                            return
                    else:
                        try:
                            await asyncio.wait_for(condition.wait(), timeout=keepalive_s)
                        except TimeoutError:
                            timed_out = True
            if timed_out:  # yield outside the lock: a slow reader must not block publishers
                yield None
            for event in events:
                last = event.seq
                yield event


def sse_frame(event: EventRecord) -> str:
    """One server-sent-events frame; the id lets a client resume with Last-Event-ID."""
    payload = json.dumps({"type": event.type, "job_id": event.job_id, "created": event.created, **event.data})
    return f"id: {event.seq}\nevent: {event.type}\ndata: {payload}\n\n"


SSE_KEEPALIVE = ": keep-alive\n\n"
