"""Job persistence in SQLite (the embedded default): jobs, their event stream, and per-step records.

One file, WAL mode, stdlib sqlite3. The methods are synchronous and guarded by one lock; async code calls them
through `AsyncJobStore`, which runs each call in a worker thread (asyncio.to_thread) so the event loop never
blocks on disk, and turns SQLite's failures (a full disk: "database or disk is full", or "disk I/O error" under a
file size limit) into StoreError naming the file. SQLite rolls the failed statement back, so the file stays
consistent and works again once there is room.

Tables
- jobs:   id, kind (train|eval), status, request JSON, progress JSON, metrics JSON, result JSON, error,
          created, updated.
- events: seq (global, increasing; the SSE event id), job_id, type, data JSON, created. Replayed from any seq.
- steps:  (job_id, step) primary key, metrics JSON. A re-run step replaces its record, so a step appears once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""


@dataclass
class JobRecord:
    id: str
    kind: str
    status: str
    request: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = 0.0
    updated: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass
class EventRecord:
    seq: int
    job_id: str
    type: str
    data: dict[str, Any]
    created: float


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        request=json.loads(row["request"]),
        progress=json.loads(row["progress"]),
        metrics=json.loads(row["metrics"]),
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        created=row["created"],
        updated=row["updated"],
    )


class JobStore:
    """Synchronous SQLite access; safe to call from several threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- jobs -------------------------------------------------------------------------------------------
    def create_job(
        self, job_id: str, kind: str, request: dict[str, Any], status: str = "queued"
    ) -> JobRecord:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, status, request, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, kind, status, json.dumps(request), now, now),
            )
        return JobRecord(id=job_id, kind=kind, status=status, request=request, created=now, updated=now)

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list_jobs(
        self, limit: int = 100, status: str | None = None, kind: str | None = None
    ) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if status:
            query, args = query + " AND status = ?", [*args, status]
        if kind:
            query, args = query + " AND kind = ?", [*args, kind]
        query += " ORDER BY created DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [_job_from_row(r) for r in rows]

    def update_job(
        self,
        job_id: str,
        *,
        status: str | None = None,
        progress: dict | None = None,
        metrics: dict | None = None,
        result: dict | None = None,
        error: str | None = None,
        clear_error: bool = False,
        event: tuple[str, dict] | None = None,
    ) -> EventRecord | None:
        """Overwrite the given fields. `progress` and `metrics` are merged into the stored dicts. `event`
        (type, data) is appended in the same transaction, so a reader never sees the one without the other."""
        with self._lock, self._transaction():
            row = self._db.execute("SELECT progress, metrics FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            sets, args = ["updated = ?"], list[Any]([time.time()])
            if status is not None:
                if status not in JOB_STATUSES:
                    raise ValueError(f"unknown job status {status!r}")
                sets.append("status = ?")
                args.append(status)
            if progress is not None:
                sets.append("progress = ?")
                args.append(json.dumps({**json.loads(row["progress"]), **progress}))
            if metrics is not None:
                sets.append("metrics = ?")
                args.append(json.dumps({**json.loads(row["metrics"]), **metrics}))
            if result is not None:
                sets.append("result = ?")
                args.append(json.dumps(result))
            if error is not None or clear_error:
                sets.append("error = ?")
                args.append(error)
            self._db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
            if event is None:
                return None
            return self._insert_event(job_id, *event)

    def mark_interrupted(self) -> list[str]:
        """On start-up: jobs that were running (or queued) when the last process died become interrupted."""
        with self._lock:
            ids = [
                r["id"]
                for r in self._db.execute(
                    "SELECT id FROM jobs WHERE status IN ('running', 'queued')"
                ).fetchall()
            ]
            self._db.execute(
                "UPDATE jobs SET status = 'interrupted', updated = ? WHERE status IN ('running', 'queued')",
                (time.time(),),
            )
        return ids

    def expired_jobs(self, keep: int, finished_before: float | None) -> list[str]:
        """Finished jobs (completed, failed, cancelled) past the retention: all but the `keep` last updated
        (0 = no count limit), and those last updated before `finished_before` (Unix time; None = no age limit)."""
        final = ", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, updated FROM jobs WHERE status IN ({final}) ORDER BY updated DESC, rowid DESC"
            ).fetchall()
        return [
            r["id"]
            for i, r in enumerate(rows)
            if (keep and i >= keep) or (finished_before is not None and r["updated"] < finished_before)
        ]

    def delete_jobs(self, job_ids: list[str]) -> int:
        """Forget jobs with their events and step records; returns how many jobs were deleted."""
        if not job_ids:
            return 0
        marks = ", ".join("?" * len(job_ids))
        with self._lock, self._transaction():
            self._db.execute(f"DELETE FROM events WHERE job_id IN ({marks})", job_ids)
            self._db.execute(f"DELETE FROM steps WHERE job_id IN ({marks})", job_ids)
            return self._db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", job_ids).rowcount

    def count_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    # --- events -----------------------------------------------------------------------------------------
    def append_event(self, job_id: str, type: str, data: dict[str, Any]) -> EventRecord:
        with self._lock:
            return self._insert_event(job_id, type, data)

    def _insert_event(self, job_id: str, type: str, data: dict[str, Any]) -> EventRecord:
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO events (job_id, type, data, created) VALUES (?, ?, ?, ?)",
            (job_id, type, json.dumps(data), now),
        )
        seq = cur.lastrowid
        assert seq is not None, "an INSERT sets lastrowid"
        return EventRecord(seq=seq, job_id=job_id, type=type, data=data, created=now)

    def events_after(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[EventRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            ).fetchall()
        return [
            EventRecord(
                seq=r["seq"],
                job_id=r["job_id"],
                type=r["type"],
                data=json.loads(r["data"]),
                created=r["created"],
            )
            for r in rows
        ]

    # --- steps ------------------------------------------------------------------------------------------
    def record_step(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO steps (job_id, step, metrics, created) VALUES (?, ?, ?, ?)",
                (job_id, step, json.dumps(metrics), time.time()),
            )

    def steps(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT step, metrics FROM steps WHERE job_id = ? ORDER BY step", (job_id,)
            ).fetchall()
        return [{**json.loads(r["metrics"]), "step": r["step"]} for r in rows]

    def drop_steps_after(self, job_id: str, step: int) -> int:
        """Forget step records past a checkpoint we rewind to; those steps will be run again."""
        with self._lock:
            cur = self._db.execute("DELETE FROM steps WHERE job_id = ? AND step > ?", (job_id, step))
        return cur.rowcount


class StoreError(RuntimeError):
    """The job store could not be read or written."""


class AsyncJobStore:
    """JobStore's methods, awaited: each call runs in a worker thread, and SQLite's failures become StoreError."""

    def __init__(self, store: JobStore):
        self.sync = store

    async def _in_thread(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"the job store {self.sync.path} could not be written: {exc} (is the disk full?)"
            ) from exc

    async def create_job(self, job_id: str, kind: str, request: dict[str, Any]) -> JobRecord:
        return await self._in_thread(self.sync.create_job, job_id, kind, request)

    async def get_job(self, job_id: str) -> JobRecord | None:
        return await self._in_thread(self.sync.get_job, job_id)

    async def list_jobs(
        self, limit: int = 100, status: str | None = None, kind: str | None = None
    ) -> list[JobRecord]:
        return await self._in_thread(self.sync.list_jobs, limit, status, kind)

    async def update_job(
        self,
        job_id: str,
        *,
        status: str | None = None,
        progress: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        clear_error: bool = False,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> EventRecord | None:
        return await self._in_thread(
            self.sync.update_job,
            job_id,
            status=status,
            progress=progress,
            metrics=metrics,
            result=result,
            error=error,
            clear_error=clear_error,
            event=event,
        )

    async def mark_interrupted(self) -> list[str]:
        return await self._in_thread(self.sync.mark_interrupted)

    async def expired_jobs(self, keep: int, finished_before: float | None) -> list[str]:
        return await self._in_thread(self.sync.expired_jobs, keep, finished_before)

    async def delete_jobs(self, job_ids: list[str]) -> int:
        return await self._in_thread(self.sync.delete_jobs, job_ids)

    async def count_by_status(self) -> dict[str, int]:
        return await self._in_thread(self.sync.count_by_status)

    async def append_event(self, job_id: str, type: str, data: dict[str, Any]) -> EventRecord:
        return await self._in_thread(self.sync.append_event, job_id, type, data)

    async def events_after(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[EventRecord]:
        return await self._in_thread(self.sync.events_after, job_id, after_seq, limit)

    async def record_step(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        await self._in_thread(self.sync.record_step, job_id, step, metrics)

    async def steps(self, job_id: str) -> list[dict[str, Any]]:
        return await self._in_thread(self.sync.steps, job_id)

    async def drop_steps_after(self, job_id: str, step: int) -> int:
        return await self._in_thread(self.sync.drop_steps_after, job_id, step)
