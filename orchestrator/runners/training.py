"""The training loop of a train job: search a batch of problems, trees -> GRPO groups, one step.

    start = start_or_resume()                                  (checkpoint 0, or a rewind to the last one)
    publish the trainer's adapter version to the student server (STUDENT_URL only)
    for step in start+1 .. total:
        trees  = run_search(p) for p in batch(step)            (concurrently: the whole batch by default)
        check_step: teacher failures and degraded modes told; a step with nothing to learn from fails the job
        items  = grpo_group(tree) for every tree                (per problem; groups without a signal dropped)
        items  = drop_stale(items)                              (samples too many adapter versions old)
        result = trainer /grpo/step(items, step_key=f"{job}:{step}")
        publish result's adapter version to the student server (STUDENT_URL only)
        record the step's metrics (generated tokens by source, and the job's total); every N steps save a
        checkpoint; every M steps a quick student eval
        once the job's generated tokens reach max_generated_tokens: save this step's checkpoint and stop

Every trainer call is bracketed by /health checks (clients/trainer.py's TrainerWatch): a trainer that restarted
lost the steps since the job's last checkpoint, so the loop rewinds to it and goes on from there
(checkpoints.py), at most MAX_TRAINER_RESTARTS times per run.

With a student server (STUDENT_URL) the student's samples come from it, under the adapter version the trainer
holds (student_server.py): published at the start of a run, after every applied step and after every rewind. A
search whose student requests failed because that server was away is done again once it is back (at most
MAX_SEARCH_REPEATS times per step); the step is sent only after its batch was searched whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from orchestrator.clients.trainer import TrainerRestarted, TrainerUnavailable, TrainerWatch
from orchestrator.gsm8k.data import Problem, read_split
from orchestrator.runners.batch_search import BatchSearch, search_batch
from orchestrator.runners.checkpoints import (
    checkpoint_due,
    rewind_after_restart,
    save_checkpoint,
    start_or_resume,
)
from orchestrator.runners.context import JobContext
from orchestrator.runners.evaluation import quick_eval
from orchestrator.runners.fault_reports import check_step, teacher_counts
from orchestrator.runners.off_policy import drop_stale
from orchestrator.runners.requests import TrainRequest, search_config, trees_in_flight
from orchestrator.runners.step_metrics import WandbSink, count_step, grpo_metrics, search_metrics
from orchestrator.runners.student_server import StudentServer
from orchestrator.runners.trajectories import GroupItem, grpo_group
from orchestrator.search.services import SearchServices
from orchestrator.settings import SearchConfig

log = logging.getLogger(__name__)
MAX_TRAINER_RESTARTS = 5  # per run of a job: a trainer that keeps dying fails the job instead of looping
MAX_SEARCH_REPEATS = 3  # per step: searches spoiled by an absent student server that are done again


def generated_tokens(steps: list[dict]) -> int:
    """The student's and the teachers' generated tokens over recorded steps (older records: search_tokens)."""
    return sum(int(s.get("generated_tokens", s.get("search_tokens")) or 0) for s in steps)


def plan_batches(num_problems: int, batch_size: int, epochs: int) -> list[list[int]]:
    """Problem indices of every step: the problems in order, epoch after epoch, cut into batches."""
    order = [i for _ in range(epochs) for i in range(num_problems)]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class TrainPlan:
    """What every step of a train job uses, fixed when the run starts."""

    request: TrainRequest
    problems: list[Problem]
    batches: list[list[int]]  # problem indices per step
    config: SearchConfig
    services: SearchServices  # shared by every search of the job (teacher weights learn across trees)
    trees_in_flight: int
    student_server: StudentServer | None = None  # STUDENT_URL set: the student's samples come from it
    max_off_policy_versions: int = 1

    @property
    def total_steps(self) -> int:
        return len(self.batches)

    def batch(self, step: int) -> list[Problem]:
        return [self.problems[i] for i in self.batches[step - 1]]

    def problems_before(self, step: int) -> int:
        """Problems (and trees) of the steps before `step`."""
        return sum(len(b) for b in self.batches[: step - 1])


async def train_step(
    ctx: JobContext, watch: TrainerWatch, plan: TrainPlan, step: int, degraded: list[str]
) -> dict:
    """One step: search its batch, check what went wrong, one GRPO update (unless every path scored the same),
    a quick eval when due; returns the step's metrics."""
    request = plan.request
    ctx.raise_if_cancelled()
    await watch.check()
    started = time.perf_counter()
    batch = plan.batch(step)
    teachers_before = teacher_counts(plan.services.teachers)
    searched, repeats = await search_step_batch(ctx, plan, step)
    # The trainer scores, steps (and may serve the student): trees grown while it was away or restarting are no
    # good. Its adapter version now is the one this step updates.
    health = await watch.check()
    await check_step(ctx, plan.services.teachers, teachers_before, searched, len(batch), degraded, step)
    group_items: list[GroupItem] = []
    dropped = 0
    for tree in searched.trees:
        group = grpo_group(
            tree,
            request.advantage_mode,
            request.advantage_clip,
            request.teacher_weight,
            scale=request.scale_advantages,
            teacher_paths=request.teacher_paths,
        )
        dropped += int(not group and bool(tree.root.children))
        group_items += group
    fresh, stale = drop_stale(group_items, health.adapter_version, plan.max_off_policy_versions)
    items = [item.to_trainer_item() for item in fresh]
    metrics = search_metrics(len(batch), searched, len(items), dropped, plan.services)
    # sampled_items: items whose tokens a student server sampled (the trainer's importance weights cover these)
    sampled = sum(1 for item in items if "sampler_logprobs" in item)
    metrics.update(stale_items=len(stale), sampled_items=sampled, search_repeats=repeats)
    if any(item["advantage"] != 0 for item in items):
        grpo_started = time.perf_counter()
        step_key = f"{ctx.job_id}:{step}"  # a repeated call is applied once (trainer contract)
        result = await watch.call(partial(ctx.trainer.grpo_step, items, request.loss, step_key=step_key))
        metrics.update(grpo_metrics(result, time.perf_counter() - grpo_started))
        if plan.student_server is not None:  # the next samples (and the eval below) come from this version
            await plan.student_server.publish(result.adapter_version, result.adapter_path)
    else:  # no tree, or every path scored the same: nothing to learn from this batch
        metrics.update(skipped=True, kl=None, loss=None)
    metrics["tokens"] = (metrics["search_tokens"] or 0) + int(metrics.get("train_tokens") or 0)
    if request.eval_every and (step % request.eval_every == 0 or step == plan.total_steps):
        metrics.update(
            await quick_eval(
                ctx.pool,
                ctx.settings,
                request.eval_examples,
                request.eval_max_tokens,
                request.eval_concurrency,
                adapters=ctx.student_adapters,
            )
        )
        await watch.check()  # the eval asked the student: a restart during it spoils the figures
    metrics["step_seconds"] = round(time.perf_counter() - started, 3)
    count_step(ctx.telemetry, metrics)
    return metrics


async def search_step_batch(ctx: JobContext, plan: TrainPlan, step: int) -> tuple[BatchSearch, int]:
    """The step's batch searched, and how many times it was searched again: with a student server, a search
    whose student requests failed because the server was away is repeated once it is back (at most
    MAX_SEARCH_REPEATS times; then the step goes on with what it has, as with any degraded search)."""
    repeats = 0
    while True:
        searched = await search_batch(
            ctx,
            plan.batch(step),
            plan.problems_before(step),
            step,
            plan.config,
            plan.services,
            plan.trees_in_flight,
        )
        ctx.raise_if_cancelled()
        if plan.student_server is None or not searched.student_unavailable or repeats == MAX_SEARCH_REPEATS:
            return searched, repeats
        await plan.student_server.recover()
        repeats += 1
        await ctx.emit(
            "search_repeated", step=step, repeat=repeats, student_unavailable=searched.student_unavailable
        )


async def run_train_job(ctx: JobContext) -> dict[str, Any]:
    from orchestrator.runners import plots  # matplotlib only when a job needs it

    request = TrainRequest.model_validate(ctx.request)
    settings = ctx.settings
    gsm8k = await asyncio.to_thread(read_split, request.split, settings.gsm8k_path)
    problems = gsm8k.problems(request.num_examples, request.offset)
    await ctx.set_progress(gsm8k=gsm8k.source.to_record())
    adapters = ctx.student_adapters
    plan = TrainPlan(
        request=request,
        problems=problems,
        batches=plan_batches(len(problems), request.batch_size, request.epochs),
        config=search_config(settings, request),
        services=SearchServices.from_settings(settings, ctx.pool, trainer=ctx.trainer, adapters=adapters),
        trees_in_flight=trees_in_flight(settings, request),
        student_server=StudentServer(adapters, settings.student_wait_s, ctx.emit) if adapters else None,
        max_off_policy_versions=settings.max_off_policy_versions,
    )
    ctx.show_live("teachers", plan.services.teachers.snapshot)  # their weights and failures on /health
    total_steps = plan.total_steps
    watch = TrainerWatch(ctx.trainer, settings.trainer_wait_s, ctx.emit)
    start = await start_or_resume(ctx, watch)
    if plan.student_server is not None:
        await plan.student_server.publish_trainer_version(await watch.health())
    checkpoint, degraded = start.checkpoint, start.degraded
    await ctx.set_progress(
        phase="training",
        step=start.step,
        total_steps=total_steps,
        problems_done=plan.problems_before(start.step + 1),
        problems_total=len(problems) * request.epochs,
    )

    wandb_config = {"request": ctx.request, "search": plan.config.model_dump()}
    wandb = await asyncio.to_thread(WandbSink, settings, ctx.job_id, wandb_config)
    run_started = time.perf_counter()
    problems_this_run = restarts = 0
    restarted: TrainerRestarted | None = None
    stop_reason = "all_steps"
    step = start.step + 1
    generated = generated_tokens(await ctx.store.steps(ctx.job_id))  # by the steps before this run
    try:
        while step <= total_steps:
            try:
                if restarted is not None:  # the trainer lost everything since our last checkpoint
                    step = 1 + await rewind_after_restart(ctx, watch, restarted)
                    generated = generated_tokens(await ctx.store.steps(ctx.job_id))
                    restarted = None
                    if plan.student_server is not None:
                        await plan.student_server.publish_trainer_version(await watch.health())
                metrics = await train_step(ctx, watch, plan, step, degraded)
                generated += metrics["generated_tokens"]
                metrics["generated_tokens_total"] = generated
                await ctx.store.record_step(ctx.job_id, step, metrics)
                problems_this_run += metrics["problems"]
                elapsed = time.perf_counter() - run_started
                await ctx.set_metrics(**{k: v for k, v in metrics.items() if k != "degraded"}, step=step)
                await ctx.emit("step", step=step, total_steps=total_steps, **metrics)
                wandb.log(step, metrics)
                budget_spent = request.max_generated_tokens is not None and (
                    generated >= request.max_generated_tokens
                )
                if budget_spent or checkpoint_due(step, request.checkpoint_every, total_steps):
                    checkpoint = await save_checkpoint(ctx, watch, step)
                await ctx.set_progress(
                    step=step,
                    problems_done=plan.problems_before(step + 1),
                    problems_per_min=round(60 * problems_this_run / elapsed, 3),
                    generated_tokens=generated,
                )
                if budget_spent:
                    stop_reason = "max_generated_tokens"
                    await ctx.emit("budget_reached", step=step, generated_tokens=generated)
                    break
                step += 1
            except TrainerRestarted as exc:
                restarts += 1
                if restarts > MAX_TRAINER_RESTARTS:
                    raise TrainerUnavailable(
                        None, f"the trainer restarted {restarts} times during this run; giving up"
                    ) from exc
                log.warning("job %s: %s; rewinding to the last checkpoint", ctx.job_id, exc)
                restarted = exc
    finally:
        await asyncio.to_thread(wandb.finish)

    train_seconds = time.perf_counter() - run_started
    steps = await ctx.store.steps(ctx.job_id)
    plot = await asyncio.to_thread(
        plots.train_curves_png, steps, ctx.path("curves.png"), f"train job {ctx.job_id}"
    )
    health = await watch.health()
    return {
        "steps": total_steps,
        "steps_done": len(steps),
        "stop_reason": stop_reason,
        "max_generated_tokens": request.max_generated_tokens,
        "generated_tokens": generated_tokens(steps),
        "student_tokens": sum(int(s.get("student_tokens") or 0) for s in steps),
        "teacher_tokens": sum(int(s.get("teacher_tokens") or 0) for s in steps),
        "applied_steps": sum(1 for s in steps if not s.get("skipped")),
        "adapter_version_start": start.adapter_version_start,
        "adapter_version": health.adapter_version,
        "checkpoint": checkpoint,
        "trees_dir": str(ctx.job_dir / "trees"),
        "trees": len(problems) * request.epochs,
        "plot": str(plot),
        "train_seconds_this_run": round(train_seconds, 2),
        "problems_this_run": problems_this_run,
        "problems_per_min": round(60 * problems_this_run / train_seconds, 3) if train_seconds > 0 else None,
        "resumed_from_step": start.step if ctx.resumed else None,
        "trainer_restarts": restarts,
        # The adapter versions this run made current on the student server (STUDENT_URL; None when unset).
        "student_adapter_versions": plan.student_server.published if plan.student_server else None,
        "degraded": degraded,
        "gsm8k": gsm8k.source.to_record(),
    }
