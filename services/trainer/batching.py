"""Dynamic batching: many concurrent callers, one worker thread that owns the model.

Callers (asyncio handlers) submit jobs and await their futures. The worker takes the first waiting job, then
waits up to `wait_ms` for more, and runs every mergeable job it collected as one batch: generation jobs with the
same adapter setting share one decode loop, log-prob jobs with the same setting share padded forward passes.
"Exclusive" jobs (a GRPO step, loading a checkpoint) run alone, so an update never overlaps a generation, and
every result is tagged with the adapter version that produced it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    kind: str  # a merge key, e.g. ("generate", True); jobs with equal kinds can share a batch; or "exclusive"
    payload: Any  # for merged jobs: the item(s) handed to the batch runner; for exclusive jobs: a callable
    rows: int = 1  # batch rows this job occupies (n samples of a generation request)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatcherCounters:
    requests: int = 0  # jobs completed or failed
    forward_batches: int = 0  # merged batches run (each one decode loop or one set of scoring passes)
    exclusive_jobs: int = 0
    max_batch_rows: int = 0
    merged_requests: int = 0  # jobs that ran in a batch together with at least one other job


class Batcher:
    """`run_batch(kind, payloads) -> results` is called on the worker thread with the payloads of one batch."""

    def __init__(self, run_batch: Callable[[Any, list[Any]], list[Any]], *, max_batch_rows: int = 32,
                 wait_ms: float = 5.0):
        self._run_batch = run_batch
        self.max_batch_rows = max_batch_rows
        self.wait_s = wait_ms / 1000.0
        self.counters = BatcherCounters()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: list[Job] = []  # taken from the queue but left for the next batch
        self._thread = threading.Thread(target=self._work, name="trainer-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    def submit(self, kind: Any, payload: Any, rows: int = 1) -> concurrent.futures.Future:
        job = Job(kind=kind, payload=payload, rows=rows)
        self._queue.put(job)
        return job.future

    async def call(self, kind: Any, payload: Any, rows: int = 1) -> Any:
        return await asyncio.wrap_future(self.submit(kind, payload, rows))

    async def exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the worker thread with nothing else running on the model."""
        return await self.call("exclusive", fn)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ----- the worker thread -----
    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _work(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            if first.kind == "exclusive":
                self._run_exclusive(first)
                continue
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.wait_s
            skipped: list[Job] = []
            while rows < self.max_batch_rows:
                try:
                    job = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if job is None:  # closing: finish this batch first
                    self._queue.put(None)
                    break
                if job.kind == "exclusive":
                    skipped.append(job)  # runs right after this batch, before anything newer
                    break
                if job.kind != first.kind or rows + job.rows > self.max_batch_rows:
                    skipped.append(job)
                    continue
                batch.append(job)
                rows += job.rows
            self._held = skipped + self._held
            self._run_merged(batch, rows)

    def _run_merged(self, batch: list[Job], rows: int) -> None:
        # A caller that went away (client disconnect) cancelled its future: drop its job.
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        rows = sum(job.rows for job in batch)
        self.counters.forward_batches += 1
        self.counters.max_batch_rows = max(self.counters.max_batch_rows, rows)
        if len(batch) > 1:
            self.counters.merged_requests += len(batch)
        try:
            results = self._run_batch(batch[0].kind, [job.payload for job in batch])
        except BaseException as exc:  # every caller of the batch learns of the failure
            for job in batch:
                job.future.set_exception(exc)
        else:
            for job, result in zip(batch, results):
                job.future.set_result(result)
        self.counters.requests += len(batch)

    def _run_exclusive(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self.counters.exclusive_jobs += 1
        try:
            job.future.set_result(job.payload())
        except BaseException as exc:
            job.future.set_exception(exc)
        self.counters.requests += 1
