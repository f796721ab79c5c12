"""What went wrong during a train step, told to the job: teacher failures and degraded modes.

    before = teacher_counts(teachers)                        (at the start of the step)
    ... search the batch ...
    tried, failed, summaries = await report_teachers(ctx, teachers, before, step)   -> "teacher_error" events
    await note_degraded(ctx, degraded, modes, step)                                 -> "degraded" events

A step in which every search raised (SearchFailed) or every teacher request failed (NoTeacherLeft) fails
the job.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.teachers import TeacherEnsemble


class NoTeacherLeft(RuntimeError):
    """Every teacher request of a step failed: the search has no teacher to learn from."""


class SearchFailed(RuntimeError):
    """Every search of a step raised."""


def error_kind(message: str | None) -> str:
    """The kind of an LLMError message: malformed | timeout | connection | http_<status> | error."""
    text = (message or "").split("] ", 1)[-1].lower()  # past the "[endpoint name] " prefix
    if "not valid json" in text or "malformed" in text:
        return "malformed"
    if "timeout" in text:
        return "timeout"
    if "connection error" in text:
        return "connection"
    status = re.search(r"http (\d{3})", text)
    return f"http_{status.group(1)}" if status else "error"


def teacher_counts(teachers: TeacherEnsemble) -> dict[str, tuple[int, int]]:
    """(requests, failures) so far per teacher of the job's ensemble."""
    return {name: (s.requests, s.failures) for name, s in teachers.states.items()}


async def report_teachers(
    ctx, teachers: TeacherEnsemble, before: dict[str, tuple[int, int]], step: int
) -> tuple[int, int, list[str]]:
    """One "teacher_error" event per teacher that failed during the step (its name, the error kind and the
    message; messages carry no API key, see llm.LLMError). Returns (requests, failures, summaries)."""
    tried = failed = 0
    summaries = []
    for name, state in teachers.states.items():
        requests0, failures0 = before.get(name, (0, 0))
        requests, failures = state.requests - requests0, state.failures - failures0
        tried, failed = tried + requests, failed + failures
        if failures:
            kind = error_kind(state.last_error)
            summaries.append(f"{name}: {kind} ({(state.last_error or '')[:200]})")
            await ctx.emit(
                "teacher_error",
                step=step,
                teacher=name,
                kind=kind,
                errors=failures,
                requests=requests,
                error=(state.last_error or "")[:300],
                resting=not teachers.healthy(name),
            )
    return tried, failed, summaries


async def note_degraded(ctx, degraded: list[str], modes: list[str], step: int) -> None:
    """Modes the job ran degraded in (checker down, uniform priors, ...): once each as an event and in the
    job's progress, so a finished job still says it."""
    new = [m for m in modes if m not in degraded]
    if not new:
        return
    degraded += new
    for mode in new:
        await ctx.emit("degraded", step=step, mode=mode)
    await ctx.store.update_job(ctx.job_id, progress={"degraded": list(degraded)})
