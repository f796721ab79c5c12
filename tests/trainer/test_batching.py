"""The dynamic batcher with a plain function as the batch runner (the batcher does not know about models)."""

import asyncio
import threading
import time

import pytest

from services.trainer.batching import Batcher


class Recorder:
    def __init__(self, delay: float = 0.0):
        self.batches: list[tuple] = []
        self.delay = delay
        self.running = 0
        self.overlap = False
        self.lock = threading.Lock()

    def __call__(self, kind, batch):
        payloads = batch.payloads
        self.batches.append((kind, list(payloads)))
        time.sleep(self.delay)
        return [(kind, p) for p in payloads]


async def test_concurrent_jobs_of_one_kind_are_merged():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_rows=32, wait_ms=50)
    try:
        results = await asyncio.gather(*(batcher.call("gen", i) for i in range(8)))
        assert results == [("gen", i) for i in range(8)]
        assert batcher.counters.requests == 8
        assert batcher.counters.forward_batches < 8
    finally:
        batcher.close()


async def test_kinds_are_never_mixed_and_rows_are_capped():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_rows=4, wait_ms=50)
    try:
        jobs = [batcher.call("a" if i % 2 else "b", i, rows=2) for i in range(8)]
        await asyncio.gather(*jobs)
        for kind, payloads in recorder.batches:
            assert {("a" if p % 2 else "b") for p in payloads} == {kind}
            assert len(payloads) * 2 <= 4
        assert batcher.counters.max_batch_rows <= 4
    finally:
        batcher.close()


async def test_exclusive_jobs_run_alone_between_batches():
    events: list[str] = []

    def run_batch(kind, batch):
        payloads = batch.payloads
        events.append(f"start {len(payloads)}")
        time.sleep(0.02)
        events.append("end")
        return payloads

    batcher = Batcher(run_batch, max_batch_rows=32, wait_ms=20)
    try:

        def exclusive():
            events.append("exclusive")
            return "done"

        calls = [batcher.call("gen", i) for i in range(4)] + [batcher.exclusive(exclusive)]
        calls += [batcher.call("gen", i) for i in range(4)]
        results = await asyncio.gather(*calls)
        assert results[4] == "done"
        position = events.index("exclusive")
        assert events[position - 1] == "end" and (
            position + 1 == len(events) or events[position + 1].startswith("start")
        )
    finally:
        batcher.close()


async def test_a_failing_batch_fails_each_of_its_callers_and_the_worker_survives():
    def run_batch(kind, batch):
        payloads = batch.payloads
        if "bad" in payloads:
            raise RuntimeError("boom")
        return payloads

    batcher = Batcher(run_batch, max_batch_rows=32, wait_ms=20)
    try:
        outcomes = await asyncio.gather(
            batcher.call("k", "bad"), batcher.call("k", "ok"), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert await batcher.call("k", "fine") == "fine"
    finally:
        batcher.close()


async def test_a_running_batch_admits_late_jobs_and_answers_early():
    started = threading.Event()
    answered_early = []

    def run_batch(kind, batch):
        started.set()
        joined = []
        deadline = time.monotonic() + 5
        while not joined and time.monotonic() < deadline:  # a decode loop polling between steps
            joined = batch.admit(free_rows=8)
            time.sleep(0.01)
        job = batch.jobs[0]
        batch.resolve(0, "first, early")
        answered_early.append(job.future.done())
        assert batch.jobs[0] is None  # answered: the batch no longer holds it (nor its result)
        return ["first, late", *[f"joined {p}" for p in joined]]

    batcher = Batcher(run_batch, max_batch_rows=32, wait_ms=0)
    try:
        first = asyncio.ensure_future(batcher.call("gen", 0))
        await asyncio.to_thread(started.wait, 5)
        late = await batcher.call("gen", 1)
        assert late == "joined 1" and await first == "first, early" and answered_early == [True]
        assert batcher.counters.forward_batches == 1 and batcher.counters.admitted_requests == 1
        assert batcher.counters.requests == 2
        assert batcher.counters.queue_wait_s > 0  # the joining job waited for the running batch to admit it
    finally:
        batcher.close()


@pytest.mark.parametrize("waiting", ["exclusive", "other kind"])
async def test_no_job_is_admitted_while_another_kind_waits(waiting):
    started, release = threading.Event(), threading.Event()
    admitted = []

    def run_batch(kind, batch):
        started.set()
        release.wait(5)
        admitted.extend(batch.admit(free_rows=8))
        return batch.payloads

    batcher = Batcher(run_batch, max_batch_rows=32, wait_ms=0)
    try:
        first = asyncio.ensure_future(batcher.call("gen", 0))
        await asyncio.to_thread(started.wait, 5)
        if waiting == "exclusive":
            update = asyncio.ensure_future(batcher.exclusive(lambda: "updated"))
        else:
            update = asyncio.ensure_future(batcher.call("logprobs", "updated"))
        late = asyncio.ensure_future(batcher.call("gen", 1))
        await asyncio.sleep(0.05)
        release.set()
        assert await first == 0 and await update == "updated" and await late == 1
        assert admitted == []
    finally:
        batcher.close()


async def test_late_jobs_join_only_every_admit_every_steps():
    """Each admission costs a prefill and a KV-cache copy, so a decode loop takes late jobs in every
    `admit_every` steps, not at every step they happen to arrive on."""
    started, queued = threading.Event(), threading.Event()
    joined_at = []

    def run_batch(kind, batch):
        started.set()
        queued.wait(5)
        for step in range(1, 9):
            if batch.admit(free_rows=8):
                joined_at.append(step)
        return batch.payloads

    batcher = Batcher(run_batch, max_batch_rows=32, wait_ms=0, admit_every=4)
    try:
        first = asyncio.ensure_future(batcher.call("gen", 0))
        await asyncio.to_thread(started.wait, 5)
        late = asyncio.ensure_future(batcher.call("gen", 1))
        await asyncio.sleep(0.05)
        queued.set()
        assert await first == 0 and await late == 1
        assert joined_at == [4]
    finally:
        batcher.close()
