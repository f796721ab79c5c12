"""What went wrong during a train step, told to the job: teacher failures and degraded modes.

    before = teacher_counts(teachers)                        (at the start of the step)
    searched = await search_batch(...)
    await check_step(ctx, teachers, before, searched, problems, degraded, step)
        report_teachers -> "teacher_error" events and one "teachers" event (each teacher's share of the step's
                           picks, its failures, failure rate and weight); note_degraded -> "degraded" events

A step in which every search raised (SearchFailed) or every teacher request failed (NoTeacherLeft) fails
the job.
"""

from __future__ import annotations

from orchestrator.runners.batch_search import BatchSearch
from orchestrator.runners.context import JobContext
from orchestrator.search.teachers import TeacherEnsemble


class NoTeacherLeft(RuntimeError):
    """Every teacher request of a step failed: the search has no teacher to learn from."""


class SearchFailed(RuntimeError):
    """Every search of a step raised."""


def teacher_counts(teachers: TeacherEnsemble) -> dict[str, tuple[int, int, int]]:
    """(requests, failures, picks) so far per teacher of the job's ensemble."""
    return {name: (s.requests, s.failures, s.picks) for name, s in teachers.states.items()}


async def check_step(
    ctx: JobContext,
    teachers: TeacherEnsemble,
    before: dict[str, tuple[int, int, int]],
    searched: BatchSearch,
    problems: int,
    degraded: list[str],
    step: int,
) -> None:
    """Tell the step's teacher failures and new degraded modes; raise when the step has nothing to learn from."""
    tried, failed, summaries = await report_teachers(ctx, teachers, before, step)
    if searched.search_errors == problems:
        raise SearchFailed(f"every search of step {step} failed: {searched.first_error}")
    if tried and failed == tried:
        raise NoTeacherLeft(
            f"every teacher failed in step {step} ({failed} requests): " + "; ".join(summaries)
        )
    await note_degraded(ctx, degraded, searched.degraded, step)


async def report_teachers(
    ctx: JobContext, teachers: TeacherEnsemble, before: dict[str, tuple[int, int, int]], step: int
) -> tuple[int, int, list[str]]:
    """One "teacher_error" event per teacher that failed during the step (its name, the kind of its last error
    and the message; messages carry no API key, see llm.LLMError), then one "teachers" event with every
    teacher's part in the step. Returns (requests, failures, summaries)."""
    tried = failed = 0
    summaries = []
    during: dict[str, tuple[int, int, int]] = {}
    for name, state in teachers.states.items():
        requests0, failures0, picks0 = before.get(name, (0, 0, 0))
        requests, failures = state.requests - requests0, state.failures - failures0
        during[name] = (requests, failures, state.picks - picks0)
        tried, failed = tried + requests, failed + failures
        if failures:
            error = state.last_error
            kind, message = (error.kind, str(error)) if error is not None else ("error", "")
            summaries.append(f"{name}: {kind} ({message[:200]})")
            await ctx.emit(
                "teacher_error",
                step=step,
                teacher=name,
                kind=kind,
                errors=failures,
                requests=requests,
                error=message[:300],
                resting=not teachers.healthy(name),
            )
    if tried:
        await ctx.emit("teachers", step=step, teachers=step_teachers(teachers, during))
    return tried, failed, summaries


def step_teachers(teachers: TeacherEnsemble, during: dict[str, tuple[int, int, int]]) -> dict[str, dict]:
    """Each teacher's picks, requests and failures in the step, its share of the step's picks, and its failure
    rate, pick weight and rest at the step's end."""
    picks = sum(p for _, _, p in during.values())
    snapshot = teachers.snapshot()
    return {
        name: {
            "picks": p,
            "pick_share": round(p / picks, 4) if picks else None,
            "requests": r,
            "failures": f,
            "failure_rate": round(snapshot[name]["failure_rate"], 4),
            "weight": round(snapshot[name]["weight"], 4),
            "resting_s": snapshot[name]["resting_s"],
        }
        for name, (r, f, p) in during.items()
    }


async def note_degraded(ctx: JobContext, degraded: list[str], modes: list[str], step: int) -> None:
    """Modes the job ran degraded in (checker down, uniform priors, ...): once each as an event and in the
    job's progress, so a finished job still says it."""
    new = [m for m in modes if m not in degraded]
    if not new:
        return
    degraded += new
    for mode in new:
        await ctx.emit("degraded", step=step, mode=mode)
    await ctx.store.update_job(ctx.job_id, progress={"degraded": list(degraded)})
