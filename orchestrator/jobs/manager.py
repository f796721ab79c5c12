"""The job manager: submit, run, cancel and resume train/eval jobs. It knows nothing of HTTP.

Life of a job: queued -> running -> completed | failed | cancelled. A job whose process died (or that was
running when the service shut down) is `interrupted`; `resume` queues it again (a train job continues from its
last checkpoint, an eval job starts over). At most `max_concurrent_jobs` run at once; the others wait queued,
at most `max_queued_jobs` of them (beyond that, submit and resume raise JobsBusy). Train jobs run one at a time
whatever `max_concurrent_jobs` says: they share one trainer, and one job rewinding it to its checkpoint (on resume
or after a trainer restart) would undo the other's steps. Eval jobs may run beside a train job.
Finished jobs past the retention (JOB_RETENTION_COUNT newest, JOB_RETENTION_DAYS) are deleted, records and folder,
at start-up and whenever a job ends (`prune`).
Every status change is stored first and then published as a "status" event. A job's final status must reach the
store: when it cannot be written (a full disk) it is tried again every few seconds while the service runs (the
job still shows as running meanwhile; after a restart it shows as interrupted and can be resumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orchestrator.clients.llm import LLMPool
from orchestrator.clients.student_adapters import StudentAdapters
from orchestrator.clients.trainer import TrainerClient
from orchestrator.jobs.context import JobCancelled, JobRun
from orchestrator.jobs.events import EventHub
from orchestrator.jobs.store import AsyncJobStore, JobRecord, JobStore, StoreError
from orchestrator.runners.context import JobContext
from orchestrator.runners.telemetry import Telemetry
from orchestrator.settings import Settings

log = logging.getLogger(__name__)

Runner = Callable[[JobContext], Awaitable[dict[str, Any]]]
RESUMABLE = frozenset({"interrupted", "failed", "cancelled"})
STORE_RETRY_S = (0.5, 10.0)  # first and longest wait between tries to store a job's final status


class JobNotFound(KeyError):
    pass


class JobsBusy(Exception):
    """Queued + running jobs are at max_concurrent_jobs + max_queued_jobs; the caller should retry later."""

    def __init__(self, limit: int):
        super().__init__(
            f"{limit} jobs are already queued or running (MAX_CONCURRENT_JOBS + MAX_QUEUED_JOBS); retry later"
        )
        self.limit = limit


class JobStateError(Exception):
    """The job is in a state that does not allow the operation (e.g. resuming a running job)."""


def default_runners() -> dict[str, Runner]:
    from orchestrator.runners.evaluation import run_eval_job
    from orchestrator.runners.training import run_train_job

    return {"train": run_train_job, "eval": run_eval_job}


class JobManager:
    def __init__(
        self,
        settings: Settings,
        store: JobStore | None = None,
        telemetry: Telemetry | None = None,
        runners: dict[str, Runner] | None = None,
    ):
        self.settings = settings
        self.store = AsyncJobStore(store or JobStore(settings.resolved_db_path))
        self.hub = EventHub(self.store)
        self.telemetry = telemetry
        self._runners = runners
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        # Per running job, what it shows on /health (JobRun.live).
        self._live: dict[str, dict[str, Callable[[], Any]]] = {}
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._trainer_owner = asyncio.Lock()  # held by the one train job that runs (see the module docstring)
        self._admitting = 0  # submits past the capacity check that have not launched their task yet
        self._closing = False
        self.pool: LLMPool | None = None
        self.trainer: TrainerClient | None = None
        # One view of the student server's adapters for every job (STUDENT_URL; None when unset): which version is
        # current, and which ones requests of any job still use.
        self.student_adapters: StudentAdapters | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Open clients and mark jobs left running by a dead process as interrupted (returned)."""
        self.pool = LLMPool.from_settings(self.settings)
        self.trainer = TrainerClient.from_settings(self.settings)
        self.student_adapters = StudentAdapters.from_settings(self.settings)
        interrupted = await self.store.mark_interrupted()
        for job_id in interrupted:
            await self.hub.publish(
                job_id,
                "status",
                {"status": "interrupted", "reason": "the orchestrator restarted while the job ran"},
            )
        await self.prune()
        return interrupted

    async def prune(self) -> list[str]:
        """Delete the finished jobs past the retention settings (records, events, steps, folder); returns
        their ids."""
        settings = self.settings
        days = settings.job_retention_days
        before = time.time() - days * 86400 if days else None
        expired = await self.store.expired_jobs(settings.job_retention_count, before)
        expired = [job_id for job_id in expired if job_id not in self._tasks]
        if not expired:
            return []
        await self.store.delete_jobs(expired)
        for job_id in expired:
            await asyncio.to_thread(shutil.rmtree, self.job_dir(job_id), ignore_errors=True)
        log.info("deleted %d finished jobs past the retention: %s", len(expired), ", ".join(expired[:10]))
        return expired

    async def close(self) -> None:
        """Stop running jobs (they become interrupted, so they can be resumed) and close the clients."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.pool is not None:
            await self.pool.aclose()
        if self.trainer is not None:
            await self.trainer.aclose()
        if self.student_adapters is not None:
            await self.student_adapters.aclose()
        self.store.sync.close()

    def job_dir(self, job_id: str) -> Path:
        return Path(self.settings.data_dir) / "jobs" / job_id

    # --- queries ------------------------------------------------------------------------------------------
    async def get(self, job_id: str) -> JobRecord:
        job = await self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def list(
        self, limit: int = 100, status: str | None = None, kind: str | None = None
    ) -> list[JobRecord]:
        return await self.store.list_jobs(limit, status, kind)

    def live(self) -> dict[str, dict[str, Any]]:
        """What the running jobs show now ({job_id: {name: snapshot}}, e.g. a train job's teachers)."""
        return {
            job_id: {name: snapshot() for name, snapshot in shown.items()}
            for job_id, shown in list(self._live.items())
            if shown
        }

    async def steps(self, job_id: str) -> list[dict[str, Any]]:
        await self.get(job_id)
        return await self.store.steps(job_id)

    # --- commands -----------------------------------------------------------------------------------------
    async def submit(self, kind: str, request: dict[str, Any]) -> JobRecord:
        if kind not in ("train", "eval"):
            raise ValueError(f"unknown job kind {kind!r}")
        with self._admission():
            job_id = f"{kind}-{uuid.uuid4().hex[:12]}"
            job = await self.store.create_job(job_id, kind, request)
            if self.telemetry is not None:
                self.telemetry.jobs_submitted.labels(kind=kind).inc()
            await self.hub.publish(job_id, "status", {"status": "queued"})
            self._launch(job, resumed=False)
        return job

    async def cancel(self, job_id: str) -> JobRecord:
        job = await self.get(job_id)
        if job.finished:
            raise JobStateError(f"job {job_id} is already {job.status}")
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            self._cancels[job_id].set()
            task.cancel()  # the runner sees CancelledError at its next await and the job becomes cancelled
            await asyncio.gather(task, return_exceptions=True)
        else:  # interrupted: nothing runs, just close it
            await self._set_status(job_id, "cancelled")
        return await self.get(job_id)

    async def resume(self, job_id: str) -> JobRecord:
        job = await self.get(job_id)
        if job_id in self._tasks or job.status not in RESUMABLE:
            raise JobStateError(f"job {job_id} is {job.status}; only {sorted(RESUMABLE)} jobs can be resumed")
        with self._admission():
            await self._set_status(job_id, "queued", clear_error=True, event_data={"resumed": True})
            self._launch(await self.get(job_id), resumed=True)
        return await self.get(job_id)

    async def wait(self, job_id: str) -> JobRecord:
        """Until the job's current run ends (tests and the CLI's in-process use)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        return await self.get(job_id)

    # --- running ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _admission(self):
        """Admit one more job or raise JobsBusy; checked and counted before the first await, so concurrent
        submits cannot all pass the check."""
        limit = self.settings.max_concurrent_jobs + self.settings.max_queued_jobs
        if len(self._tasks) + self._admitting >= limit:
            raise JobsBusy(limit)
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    def _launch(self, job: JobRecord, resumed: bool) -> None:
        self._cancels[job.id] = asyncio.Event()
        task = asyncio.create_task(self._run(job, resumed), name=f"job {job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t, job_id=job.id: self._forget(job_id))

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._cancels.pop(job_id, None)
        self._live.pop(job_id, None)

    async def _set_status(self, job_id: str, status: str, **fields: Any) -> None:
        """Store the status and its "status" event together, then wake the followers."""
        event = {
            "status": status,
            **({"error": fields["error"]} if fields.get("error") else {}),
            **fields.pop("event_data", {}),
        }
        await self.store.update_job(job_id, status=status, event=("status", event), **fields)
        await self.hub.notify(job_id)

    async def _run(self, job: JobRecord, resumed: bool) -> None:
        runners = self._runners or default_runners()
        try:
            # The train lock first: a train job waiting for it must not hold a slot an eval job could use.
            exclusive = self._trainer_owner if job.kind == "train" else contextlib.nullcontext()
            async with exclusive, self._slots:
                await self._set_status(job.id, "running")
                assert self.pool is not None and self.trainer is not None, "start() opens the clients"
                ctx = JobRun(
                    job_id=job.id,
                    request=job.request,
                    settings=self.settings,
                    store=self.store,
                    hub=self.hub,
                    pool=self.pool,
                    trainer=self.trainer,
                    job_dir=self.job_dir(job.id),
                    cancel=self._cancels[job.id],
                    telemetry=self.telemetry,
                    resumed=resumed,
                    live=self._live.setdefault(job.id, {}),
                    student_adapters=self.student_adapters,
                )
                ctx.job_dir.mkdir(parents=True, exist_ok=True)
                result = await runners[job.kind](ctx)
        except (asyncio.CancelledError, JobCancelled):
            status = "interrupted" if self._closing and not self._cancels[job.id].is_set() else "cancelled"
            await asyncio.shield(self._set_status(job.id, status))
            if status == "cancelled":
                await asyncio.shield(self._prune_quietly())
            return
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self._set_final_status(job.id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        else:
            await self._set_final_status(job.id, "completed", result=result)
        await self._prune_quietly()

    async def _prune_quietly(self) -> None:
        """Retention after a job ended: a failure to prune (a full disk) must not touch the job's own result."""
        try:
            await self.prune()
        except (StoreError, OSError):
            log.exception("pruning finished jobs failed; trying again when the next job ends")

    async def _set_final_status(self, job_id: str, status: str, **fields: Any) -> None:
        delay, longest = STORE_RETRY_S
        while True:
            try:
                return await self._set_status(job_id, status, **fields)
            except StoreError as exc:
                log.error(
                    "job %s: cannot store status %s: %s; trying again in %g s", job_id, status, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, longest)
