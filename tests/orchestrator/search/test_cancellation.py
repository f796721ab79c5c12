import asyncio

import pytest

from orchestrator.search.cancellation import until_done_or_cancelled


async def test_work_that_finishes_is_not_cancelled():
    work = asyncio.ensure_future(asyncio.sleep(0.01, result="done"))
    assert await until_done_or_cancelled(work, asyncio.Event()) is False
    assert work.result() == "done"
    assert await until_done_or_cancelled(asyncio.ensure_future(asyncio.sleep(0)), None) is False


async def test_a_set_cancel_event_cancels_the_work_and_waits_for_it():
    cancel, stopped = asyncio.Event(), asyncio.Event()

    async def forever():
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    work = asyncio.ensure_future(forever())
    asyncio.get_running_loop().call_later(0.01, cancel.set)
    assert await until_done_or_cancelled(work, cancel) is True
    assert work.cancelled() and stopped.is_set()


async def test_a_failure_of_the_work_is_raised_not_taken_for_a_cancellation():
    async def bug():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await until_done_or_cancelled(asyncio.ensure_future(bug()), asyncio.Event())


async def test_no_waiter_is_left_behind_when_the_caller_is_cancelled():
    cancel = asyncio.Event()
    work = asyncio.ensure_future(asyncio.sleep(3600))
    caller = asyncio.ensure_future(until_done_or_cancelled(work, cancel))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    work.cancel()
    await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert all(t.done() for t in others)
