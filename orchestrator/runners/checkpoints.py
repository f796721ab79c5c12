"""A train job's trainer checkpoints: where a run starts, what it saves, and the rewind to the last one.

A job starts by saving checkpoint "<job>-step000000"; every checkpoint's name and step go into the job's
progress. Resuming (or finding that the trainer restarted) loads the last one (trainer POST /checkpoints/load),
forgets the step records past it and continues with the next step number, so the count is continuous. Steps
after the checkpoint that the trainer had applied before the crash are undone by the load and applied once more
onto the restored adapter; a step sent twice in a row carries the same step_key, which the trainer applies only
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.clients.trainer import TrainerRestarted, TrainerWatch
from orchestrator.runners.context import JobContext


def checkpoint_name(job_id: str, step: int) -> str:
    return f"{job_id}-step{step:06d}"


def checkpoint_due(step: int, every: int, total_steps: int) -> bool:
    """Every `every` steps, and after the last."""
    return step % every == 0 or step == total_steps


@dataclass
class RunStart:
    """Where a run of a train job begins."""

    step: int  # the last step done (0 for a new job); the run goes on with the next
    checkpoint: dict[str, Any]  # the checkpoint the trainer holds now
    adapter_version_start: int | None  # the adapter version before the job's first step
    degraded: list[str]  # degraded modes told so far (fault_reports.note_degraded adds to it)


async def start_or_resume(ctx: JobContext, watch: TrainerWatch) -> RunStart:
    """A new job records the trainer it starts from and saves checkpoint 0; a resumed one rewinds the trainer
    to its last checkpoint."""
    job = await ctx.store.get_job(ctx.job_id)
    progress = job.progress if job is not None else {}
    degraded: list[str] = list(progress.get("degraded", []))
    checkpoint = progress.get("checkpoint")
    if checkpoint:
        step = await rewind(ctx, watch, checkpoint, "resumed")
        return RunStart(step, checkpoint, progress.get("adapter_version_start"), degraded)
    health = await watch.health()
    watch.accept(health)
    adapter_start = health.adapter_version
    await ctx.store.update_job(
        ctx.job_id,
        progress={"adapter_version_start": adapter_start, "trainer_step_start": health.step},
    )
    return RunStart(0, await save_checkpoint(ctx, watch, 0), adapter_start, degraded)


async def save_checkpoint(ctx: JobContext, watch: TrainerWatch, step: int) -> dict[str, Any]:
    """Save and record the job's checkpoint; recorded only when the same trainer process answered before and
    after the save (else TrainerRestarted, and the file, whatever it holds, is never loaded)."""
    saved = await watch.call(lambda: ctx.trainer.save_checkpoint(checkpoint_name(ctx.job_id, step)))
    checkpoint = {
        "name": saved.name,
        "step": step,
        "path": saved.path,
        "adapter_version": saved.adapter_version,
        "trainer_step": saved.step,
    }
    await ctx.store.update_job(ctx.job_id, progress={"checkpoint": checkpoint})
    await ctx.emit("checkpoint", **checkpoint)
    return checkpoint


async def rewind(
    ctx: JobContext, watch: TrainerWatch, checkpoint: dict[str, Any], event: str, **data: Any
) -> int:
    """Load the job's checkpoint into the trainer there now and forget the step records after it; returns the
    checkpoint's step (the job goes on with the next one)."""
    watch.accept(await watch.health())  # the job's state is about to live in this process
    loaded = await watch.call(lambda: ctx.trainer.load_checkpoint(checkpoint["name"]))
    start_step = int(checkpoint["step"])
    dropped = await ctx.store.drop_steps_after(ctx.job_id, start_step)
    await ctx.emit(
        event,
        from_step=start_step,
        checkpoint=checkpoint["name"],
        dropped_steps=dropped,
        adapter_version=loaded.adapter_version,
        trainer_step=loaded.step,
        **data,
    )
    return start_step


async def rewind_after_restart(ctx: JobContext, watch: TrainerWatch, restarted: TrainerRestarted) -> int:
    """The trainer lost everything since the job's last checkpoint: rewind to it; returns its step."""
    job = await ctx.store.get_job(ctx.job_id)
    assert job is not None, "a running job has a record"
    return await rewind(
        ctx,
        watch,
        job.progress["checkpoint"],
        "trainer_restarted",
        started_at=restarted.health.started_at,
    )
