"""The search of one train step's batch: every problem's tree grown concurrently and saved in the job's folder.

One failed search costs its tree, not the step (it is counted and told as a "search_error" event); the step's
fault checks (fault_reports.check_step) decide whether enough of the batch is left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.gsm8k.data import Problem
from orchestrator.runners.context import JobContext
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search
from orchestrator.search.tree import Tree
from orchestrator.settings import SearchConfig

log = logging.getLogger(__name__)


@dataclass
class BatchSearch:
    """The trees of a batch and its searches' summed stats."""

    trees: list[Tree] = field(default_factory=list)
    requests: int = 0
    tokens: int = 0  # generated: student_tokens + teacher_tokens
    student_tokens: int = 0
    teacher_tokens: int = 0
    teacher_errors: int = 0
    student_unavailable: int = 0  # student requests the server could not serve (it was away, or restarting)
    search_errors: int = 0
    first_error: str | None = None
    degraded: list[str] = field(default_factory=list)  # each mode once, in the order first met
    seconds: float = 0.0


async def write_job_file(path: Path, text: str) -> None:
    """A job file, or an OSError that names it (a full disk fails the job with a reason one can act on)."""
    try:
        await asyncio.to_thread(path.write_text, text)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the job file {path}: {exc.strerror or exc}") from exc


async def search_batch(
    ctx: JobContext,
    problems: list[Problem],
    first_tree: int,
    step: int,
    config: SearchConfig,
    services: SearchServices,
    trees_in_flight: int,
) -> BatchSearch:
    """Search every problem of a batch concurrently (at most `trees_in_flight` at once); save each tree as
    trees/<n>.json, n counting the job's trees from `first_tree`."""
    limit = asyncio.Semaphore(trees_in_flight)
    batch = BatchSearch()
    started = time.perf_counter()

    async def one(i: int, problem: Problem) -> Tree | None:
        async with limit:
            search_started = time.perf_counter()
            try:
                result = await run_search(problem, config, services, cancel=ctx.cancel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failed search costs its tree, not the step
                log.exception("search of %s failed", problem.id)
                batch.search_errors += 1
                batch.first_error = batch.first_error or f"{type(exc).__name__}: {exc}"[:500]
                await ctx.emit("search_error", step=step, problem_id=problem.id, error=str(exc)[:500])
                return None
        seconds = time.perf_counter() - search_started
        n = first_tree + i
        record = {
            "n": n,
            "step": step,
            "problem": problem.to_record(),
            "stats": result.stats,
            "tree": result.tree.to_json(),
        }
        await write_job_file(ctx.path("trees", f"{n:06d}.json"), json.dumps(record))
        batch.requests += int(result.stats.get("requests", 0) or 0)
        batch.tokens += int(result.stats.get("tokens", 0) or 0)
        batch.student_tokens += int(result.stats.get("student_tokens", 0) or 0)
        batch.teacher_tokens += int(result.stats.get("teacher_tokens", 0) or 0)
        batch.teacher_errors += int(result.stats.get("teacher_errors", 0) or 0)
        batch.student_unavailable += int(result.stats.get("student_unavailable", 0) or 0)
        batch.degraded += [d for d in result.stats.get("degraded", []) if d not in batch.degraded]
        if ctx.telemetry is not None:
            ctx.telemetry.searches.inc()
            ctx.telemetry.search_seconds.observe(seconds)
        await ctx.emit("tree", step=step, n=n, problem_id=problem.id, seconds=round(seconds, 2))
        return result.tree

    trees = await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    batch.trees = [t for t in trees if t is not None]
    batch.seconds = time.perf_counter() - started
    return batch
