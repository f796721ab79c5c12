"""Dynamic batching: many concurrent callers, one worker thread that owns the model.

Callers (asyncio handlers) submit jobs and await their futures. The worker takes the first waiting job, then
waits up to `wait_ms` for more, and runs every mergeable job it collected as one batch: generation jobs with the
same adapter setting share one decode loop, log-prob jobs with the same setting share padded forward passes.
A running batch may also `admit` jobs that arrive while it runs (continuous batching of generation) and
`resolve` a job as soon as it is done. "Exclusive" jobs (a GRPO step, a checkpoint) run alone, so an update
never overlaps a generation, and every result is tagged with the adapter version that produced it. While any job
of another kind (or an exclusive one) waits, a running batch admits nothing new, so nothing starves.
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

EXCLUSIVE = "exclusive"


@dataclass
class Job:
    kind: Any  # a merge key, e.g. ("generate", True): jobs of equal kinds can share a batch; or EXCLUSIVE
    payload: Any  # for merged jobs: what the batch runner gets; for exclusive jobs: a callable
    rows: int = 1  # batch rows this job occupies (n samples of a generation request)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.monotonic)  # when it was queued (for queue_wait_s)


@dataclass
class BatcherCounters:
    requests: int = 0  # jobs completed or failed
    forward_batches: int = 0  # merged batches run (each one decode loop or one set of scoring passes)
    exclusive_jobs: int = 0
    max_batch_rows: int = 0
    merged_requests: int = 0  # jobs that ran in a batch together with at least one other job
    admitted_requests: int = 0  # jobs that joined a batch already running
    queue_wait_s: float = 0.0  # seconds jobs waited, in all, from being queued to starting or joining a batch


class Batch:
    """What a batch runner sees: the payloads, plus ways to take in late jobs and to answer jobs early."""

    def __init__(self, batcher: Batcher, kind: Any, jobs: list[Job]):
        # jobs[i] is None once resolved: a continuous batch under steady traffic never ends, and its answered
        # jobs (each holding its result) would pile up
        self._batcher, self.kind = batcher, kind
        self.jobs: list[Job | None] = list(jobs)
        self.rows = sum(job.rows for job in jobs)  # rows of every job that ran in it, answered or not
        self._admit_calls = 0
        self._count(jobs_before=0)

    def _count(self, jobs_before: int) -> None:
        """The batcher's counters as the batch forms and grows, not after it ends: a continuous batch answers
        its jobs as they finish, and a caller may read the counters as soon as its answer comes."""
        counters = self._batcher.counters
        counters.max_batch_rows = max(counters.max_batch_rows, self.rows)
        if len(self.jobs) > 1:  # every job of a batch of two or more is merged, the first one too
            counters.merged_requests += len(self.jobs) - (jobs_before if jobs_before > 1 else 0)

    @property
    def payloads(self) -> list[Any]:
        return [job.payload for job in self.jobs if job is not None]

    def admit(self, free_rows: int) -> list[Any]:
        """Payloads of waiting jobs of this batch's kind that fit in free_rows (they join the batch).

        Called between decode steps, it takes jobs only every `admit_every` calls: each admission costs a
        prefill pass and a copy of the whole KV cache, and requests that trickle in one by one (as they do
        while the decode loop holds the GIL) would otherwise pay that on nearly every step."""
        self._admit_calls += 1
        if self._admit_calls % self._batcher.admit_every:
            return []
        joined = self._batcher._take_matching(self.kind, free_rows)
        if joined:
            jobs_before = len(self.jobs)
            self.jobs.extend(joined)
            self.rows += sum(job.rows for job in joined)
            self._count(jobs_before)
        return [job.payload for job in joined]

    def resolve(self, index: int, result: Any) -> None:
        job = self.jobs[index]
        if job is not None:
            self.jobs[index] = None
            self._batcher._finish(job, result=result)


class Batcher:
    """`run_batch(kind, batch) -> results` runs on the worker thread; results[i] answers batch.jobs[i]."""

    def __init__(
        self,
        run_batch: Callable[[Any, Batch], list[Any]],
        *,
        max_batch_rows: int = 32,
        wait_ms: float = 5.0,
        admit_every: int = 1,
    ):
        self._run_batch = run_batch
        self.max_batch_rows = max_batch_rows
        self.admit_every = max(1, admit_every)
        self.wait_s = wait_ms / 1000.0
        self.counters = BatcherCounters()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        # Taken from the queue, waiting for a later batch (worker thread only); None = the shutdown sentinel.
        self._held: list[Job | None] = []
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
        return await self.call(EXCLUSIVE, fn)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ----- the worker thread -----
    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.pop(0)
        if timeout is None:
            return self._queue.get()
        return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()

    def _drain(self) -> None:
        while True:
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _take_matching(self, kind: Any, free_rows: int) -> list[Job]:
        self._drain()
        if any(job is None or job.kind != kind for job in self._held):
            # An update, a shutdown or a job of another kind is waiting: let the running batch drain so it goes
            # next, rather than starving it behind a steady stream of this kind.
            return []
        taken: list[Job] = []
        kept: list[Job | None] = []
        for job in [job for job in self._held if job is not None]:  # all of them: the check above saw no None
            if job.kind == kind and job.rows <= free_rows and job.future.set_running_or_notify_cancel():
                taken.append(job)
                free_rows -= job.rows
                self.counters.queue_wait_s += time.monotonic() - job.submitted
            elif not job.future.cancelled():
                kept.append(job)
        self._held = kept
        self.counters.admitted_requests += len(taken)
        return taken

    def _work(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            if first.kind == EXCLUSIVE:
                self._run_exclusive(first)
                continue
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.wait_s
            skipped: list[Job | None] = []
            while rows < self.max_batch_rows:
                try:
                    job = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if job is None or job.kind == EXCLUSIVE:  # runs right after this batch, before anything newer
                    skipped.append(job)
                    break
                if job.kind != first.kind or rows + job.rows > self.max_batch_rows:
                    skipped.append(job)
                    continue
                batch.append(job)
                rows += job.rows
            self._held = skipped + self._held
            self._run_merged(batch)

    def _finish(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        if job.future.done():
            return
        # Count before answering: the caller may read the counters as soon as its future is done.
        self.counters.requests += 1
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _run_merged(self, jobs: list[Job]) -> None:
        # A caller that went away (client disconnect) cancelled its future: drop its job.
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        started = time.monotonic()
        self.counters.queue_wait_s += sum(started - job.submitted for job in jobs)
        self.counters.forward_batches += 1
        batch = Batch(self, jobs[0].kind, jobs)
        try:
            results = self._run_batch(batch.kind, batch)
        except BaseException as exc:  # every caller of the batch still waiting learns of the failure
            for job in batch.jobs:
                if job is not None:
                    self._finish(job, error=exc)
        else:
            for job, result in zip(batch.jobs, results, strict=False):
                if job is not None:
                    self._finish(job, result=result)

    def _run_exclusive(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self.counters.exclusive_jobs += 1
        try:
            result = job.payload()
        except BaseException as exc:
            self._finish(job, error=exc)
        else:
            self._finish(job, result=result)
