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

from orchestrator.jobs.store import AsyncJobStore, EventRecord

KEEPALIVE_S = 15.0


class EventHub:
    """Followers wait on a per-job asyncio.Event that `notify` sets and replaces. No lock is held while the
    store is read or a follower waits, so a client that hangs up mid-wait (its task cancelled) cannot leave
    anything held that would block the job's publishers (an asyncio.Condition under wait_for could)."""

    def __init__(self, store: AsyncJobStore):
        self.store = store
        self._news: dict[str, asyncio.Event] = {}

    async def publish(self, job_id: str, type: str, data: dict[str, Any]) -> EventRecord:
        event = await self.store.append_event(job_id, type, data)
        await self.notify(job_id)
        return event

    async def notify(self, job_id: str) -> None:
        """Wake the followers of a job (after an event was stored by other means)."""
        news = self._news.pop(job_id, None)
        if news is not None:
            news.set()

    async def follow(
        self, job_id: str, after_seq: int = 0, keepalive_s: float = KEEPALIVE_S
    ) -> AsyncIterator[EventRecord | None]:
        """Stored events after `after_seq`, then new ones as they come; ends once the job has finished and
        every event is out. Yields None after `keepalive_s` without news (the caller sends a keep-alive)."""
        last = after_seq
        while True:
            # Taken before the store is read: anything published after the read sets this very event.
            news = self._news.setdefault(job_id, asyncio.Event())
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
                        await asyncio.wait_for(news.wait(), timeout=keepalive_s)
                    except TimeoutError:
                        yield None
                    continue
            for event in events:
                last = event.seq
                yield event


def sse_frame(event: EventRecord) -> str:
    """One server-sent-events frame; the id lets a client resume with Last-Event-ID."""
    payload = json.dumps({"type": event.type, "job_id": event.job_id, "created": event.created, **event.data})
    return f"id: {event.seq}\nevent: {event.type}\ndata: {payload}\n\n"


SSE_KEEPALIVE = ": keep-alive\n\n"
