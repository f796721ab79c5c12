"""Running a search until it is done or its job's cancel event is set: both search shapes drive their work this way."""

from __future__ import annotations

import asyncio


async def until_done_or_cancelled(work: asyncio.Future, cancel: asyncio.Event | None) -> bool:
    """Await `work` until it finishes or `cancel` is set; True when it was cancelled (it is then cancelled and
    awaited here). A failure of the work is raised, so a bug in a search is never taken for a cancellation."""
    if cancel is None:
        await work
        return False
    waiter = asyncio.create_task(cancel.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if work.done():
        work.result()
        return False
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return True
