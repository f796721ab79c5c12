"""The training loop of a train job: search a batch of problems, trees -> GRPO groups, one step.

    for step in start+1 .. total:
        trees  = run_search(p) for p in batch(step)            (concurrently, at most trees_in_flight)
        items  = grpo_group(tree) for every tree                (z-scored, clipped advantages per problem)
        result = trainer /grpo/step(items, step_key=f"{job}:{step}")
        record the step's metrics; every N steps save a checkpoint; every M steps a quick student eval

Resume: a job starts by saving checkpoint "<job>-step000000"; every checkpoint name and step go into the job's
progress. Resuming loads the last one (trainer POST /checkpoints/load), forgets step records past it and
continues with the next step number, so the count is continuous. Steps after the checkpoint that the trainer
had applied before the crash are undone by the load and applied once more onto the restored adapter; a step
sent twice in a row carries the same step_key, which the trainer applies only once.

A step's teacher failures and degraded modes are told to the job by fault_reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial
from typing import Any

from orchestrator.data import Problem, load_gsm8k
from orchestrator.evaluation import answer_all, build_report, model_endpoints
from orchestrator.fault_reports import (
    NoTeacherLeft,
    SearchFailed,
    note_degraded,
    report_teachers,
    teacher_counts,
)
from orchestrator.schemas import TrainRequest
from orchestrator.search import SearchConfig, SearchServices, run_search
from orchestrator.trainer_client import TrainerRestarted, TrainerUnavailable, TrainerWatch
from orchestrator.trajectories import grpo_group, trajectories

log = logging.getLogger(__name__)
MAX_TRAINER_RESTARTS = 5  # per run of a job: a trainer that keeps dying fails the job instead of looping


def plan_batches(num_problems: int, batch_size: int, epochs: int) -> list[list[int]]:
    """Problem indices of every step: the problems in order, epoch after epoch, cut into batches."""
    order = [i for _ in range(epochs) for i in range(num_problems)]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def checkpoint_name(job_id: str, step: int) -> str:
    return f"{job_id}-step{step:06d}"


def search_config(settings, request: TrainRequest) -> SearchConfig:
    """The service defaults (MAX_TREE_DEPTH, NUM_MCTS_ITERATIONS, ...) with the request's overrides."""
    return SearchConfig.from_settings(settings, **request.search.overrides())


def tree_metrics(trees: list[Any]) -> dict[str, Any]:
    """Mean leaf reward and share of correct leaves over every root-to-terminal path of the step's trees."""
    paths = [t for tree in trees for t in trajectories(tree)]
    rewards = [float(p.reward) for p in paths if p.reward is not None]
    return {
        "trajectories": len(paths),
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "correct_leaf_share": sum(bool(p.correct) for p in paths) / len(paths) if paths else None,
    }


def teacher_weights(services: SearchServices) -> dict[str, float] | None:
    """The ensemble's current dynamic weights, when it exposes them."""
    teachers = getattr(services, "teachers", None)
    weights = getattr(teachers, "weights", None)
    if callable(weights):
        weights = weights()
    if isinstance(weights, dict):
        return {str(k): round(float(v), 4) for k, v in weights.items()}
    return None


class _WandbSink:
    """Per-step metrics to Weights & Biases when WANDB_PROJECT is set and wandb is installed."""

    def __init__(self, settings, job_id: str, config: dict[str, Any]):
        self.run = None
        if not settings.wandb_project:
            return
        try:
            import wandb  # optional dependency
        except ImportError:
            log.warning("WANDB_PROJECT is set but wandb is not installed; not logging to W&B")
            return
        key = settings.wandb_api_key.get_secret_value() if settings.wandb_api_key else None
        if key:
            wandb.login(key=key, relogin=False)
        self.run = wandb.init(
            project=settings.wandb_project, name=job_id, id=job_id, resume="allow", config=config, reinit=True
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


async def _write_job_file(path, text: str) -> None:
    """A job file, or an OSError that names it (a full disk fails the job with a reason one can act on)."""
    try:
        await asyncio.to_thread(path.write_text, text)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the job file {path}: {exc.strerror or exc}") from exc


async def _search_batch(
    ctx,
    problems: list[Problem],
    first_tree: int,
    step: int,
    config: SearchConfig,
    services: SearchServices,
    trees_in_flight: int,
) -> tuple[list[Any], dict[str, Any]]:
    """Search every problem of a batch concurrently; save each tree; return the trees and summed stats."""
    limit = asyncio.Semaphore(trees_in_flight)
    totals: dict[str, Any] = {
        "requests": 0,
        "tokens": 0,
        "teacher_errors": 0,
        "search_errors": 0,
        "first_error": None,
        "degraded": [],
    }

    async def one(i: int, problem: Problem):
        async with limit:
            started = time.perf_counter()
            try:
                result = await run_search(problem, config, services, cancel=ctx.cancel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failed search costs its tree, not the step
                log.exception("search of %s failed", problem.id)
                totals["search_errors"] += 1
                totals["first_error"] = totals["first_error"] or f"{type(exc).__name__}: {exc}"[:500]
                await ctx.emit("search_error", step=step, problem_id=problem.id, error=str(exc)[:500])
                return None
        seconds = time.perf_counter() - started
        n = first_tree + i
        record = {
            "n": n,
            "step": step,
            "problem": problem.to_record(),
            "stats": result.stats,
            "tree": result.tree.to_json(),
        }
        await _write_job_file(ctx.path("trees", f"{n:06d}.json"), json.dumps(record))
        for key in ("requests", "tokens", "teacher_errors"):
            totals[key] += int(result.stats.get(key, 0) or 0)
        totals["degraded"] += [d for d in result.stats.get("degraded", []) if d not in totals["degraded"]]
        if ctx.telemetry is not None:
            ctx.telemetry.searches.inc()
            ctx.telemetry.search_seconds.observe(seconds)
        await ctx.emit("tree", step=step, n=n, problem_id=problem.id, seconds=round(seconds, 2))
        return result.tree

    trees = await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    return [t for t in trees if t is not None], totals


async def _quick_eval(ctx, request: TrainRequest) -> dict[str, float]:
    """Student accuracy on the first eval_examples test problems (greedy), for the curves."""
    problems = await asyncio.to_thread(load_gsm8k, "test", ctx.settings.gsm8k_path, request.eval_examples, 0)
    rows = await answer_all(
        problems,
        ["student"],
        ctx.pool,
        model_endpoints(ctx.settings),
        request.eval_max_tokens,
        concurrency=request.eval_concurrency,
    )
    student = build_report(rows, ["student"])["models"]["student"]
    return {"eval_strict_acc": student["strict_acc"], "eval_flexible_acc": student["flexible_acc"]}


async def _save_checkpoint(ctx, watch: TrainerWatch, step: int) -> dict[str, Any]:
    """Save and record the job's checkpoint; recorded only when the same trainer process answered before and
    after the save (else TrainerRestarted, and the file, whatever it holds, is never loaded)."""
    saved = await watch.call(lambda: ctx.trainer.save_checkpoint(checkpoint_name(ctx.job_id, step)))
    checkpoint = {
        "name": saved["name"],
        "step": step,
        "path": saved.get("path"),
        "adapter_version": saved.get("adapter_version"),
        "trainer_step": saved.get("step"),
    }
    await ctx.store.update_job(ctx.job_id, progress={"checkpoint": checkpoint})
    await ctx.emit("checkpoint", **checkpoint)
    return checkpoint


async def _rewind(ctx, watch: TrainerWatch, checkpoint: dict[str, Any], event: str, **data: Any) -> int:
    """Load the job's last checkpoint into the trainer there now and forget the step records after it;
    returns the checkpoint's step (the job goes on with the next one)."""
    watch.accept(await watch.health())  # the job's state is about to live in this process
    loaded = await watch.call(lambda: ctx.trainer.load_checkpoint(checkpoint["name"]))
    start_step = int(checkpoint["step"])
    dropped = await ctx.store.drop_steps_after(ctx.job_id, start_step)
    await ctx.emit(
        event,
        from_step=start_step,
        checkpoint=checkpoint["name"],
        dropped_steps=dropped,
        adapter_version=loaded.get("adapter_version"),
        trainer_step=loaded.get("step"),
        **data,
    )
    return start_step


async def run_train_job(ctx) -> dict[str, Any]:
    from orchestrator import plots  # matplotlib only when a job needs it

    request = TrainRequest.model_validate(ctx.request)
    settings = ctx.settings
    problems = await asyncio.to_thread(
        load_gsm8k, request.split, settings.gsm8k_path, request.num_examples, request.offset
    )
    batches = plan_batches(len(problems), request.batch_size, request.epochs)
    total_steps = len(batches)
    config = search_config(settings, request)
    services = SearchServices.from_settings(settings, ctx.pool, trainer=ctx.trainer)
    trees_in_flight = request.trees_in_flight or settings.max_trees_in_flight
    loss = request.loss.model_dump(exclude_none=True)
    watch = TrainerWatch(ctx.trainer, settings.trainer_wait_s, ctx.emit)

    job = await ctx.store.get_job(ctx.job_id)
    degraded: list[str] = list(job.progress.get("degraded", []))
    checkpoint = job.progress.get("checkpoint")
    if checkpoint:  # resume: rewind the trainer to our last checkpoint and continue after it
        start_step = await _rewind(ctx, watch, checkpoint, "resumed")
        adapter_start = job.progress.get("adapter_version_start")
    else:
        start_step = 0
        health = await watch.health()
        watch.accept(health)
        adapter_start = health.get("adapter_version")
        await ctx.store.update_job(
            ctx.job_id,
            progress={"adapter_version_start": adapter_start, "trainer_step_start": health.get("step")},
        )
        checkpoint = await _save_checkpoint(ctx, watch, 0)

    await ctx.set_progress(
        phase="training",
        step=start_step,
        total_steps=total_steps,
        problems_done=sum(len(b) for b in batches[:start_step]),
        problems_total=sum(len(b) for b in batches),
    )
    wandb = _WandbSink(settings, ctx.job_id, {"request": ctx.request, "search": config.model_dump()})
    run_started = time.perf_counter()
    problems_this_run = 0
    last_result: dict[str, Any] = {}
    restarts = 0
    restarted: TrainerRestarted | None = None
    step = start_step + 1
    try:
        while step <= total_steps:
            try:
                if restarted is not None:  # the trainer lost everything since our last checkpoint
                    checkpoint = (await ctx.store.get_job(ctx.job_id)).progress["checkpoint"]
                    step = 1 + await _rewind(
                        ctx,
                        watch,
                        checkpoint,
                        "trainer_restarted",
                        started_at=restarted.health.get("started_at"),
                    )
                    restarted = None
                ctx.raise_if_cancelled()
                await watch.check()
                step_started = time.perf_counter()
                batch = [problems[i] for i in batches[step - 1]]
                first_tree = sum(len(b) for b in batches[: step - 1])
                teachers_before = teacher_counts(services.teachers)
                trees, search_stats = await _search_batch(
                    ctx, batch, first_tree, step, config, services, trees_in_flight
                )
                search_seconds = time.perf_counter() - step_started
                ctx.raise_if_cancelled()
                # The student is served by the trainer: trees grown while it was away or restarting are no good.
                await watch.check()
                tried, failed, summaries = await report_teachers(
                    ctx, services.teachers, teachers_before, step
                )
                if search_stats["search_errors"] == len(batch):
                    raise SearchFailed(f"every search of step {step} failed: {search_stats['first_error']}")
                if tried and failed == tried:
                    raise NoTeacherLeft(
                        f"every teacher failed in step {step} ({failed} requests): " + "; ".join(summaries)
                    )
                await note_degraded(ctx, degraded, search_stats["degraded"], step)
                items = [
                    item.to_trainer_item()
                    for tree in trees
                    for item in grpo_group(
                        tree, request.advantage_mode, request.advantage_clip, request.teacher_weight
                    )
                ]
                metrics: dict[str, Any] = {
                    "problems": len(batch),
                    "trees": len(trees),
                    "items": len(items),
                    **tree_metrics(trees),
                    "teacher_weights": teacher_weights(services),
                    "search_tokens": search_stats["tokens"],
                    "search_requests": search_stats["requests"],
                    "teacher_errors": search_stats["teacher_errors"],
                    "search_errors": search_stats["search_errors"],
                    "degraded": search_stats["degraded"],
                    "search_seconds": round(search_seconds, 3),
                }
                if any(item["advantage"] != 0 for item in items):
                    grpo_started = time.perf_counter()
                    step_key = f"{ctx.job_id}:{step}"  # a repeated call is applied once (trainer contract)
                    last_result = await watch.call(
                        partial(ctx.trainer.grpo_step, items, loss, step_key=step_key)
                    )
                    metrics.update(
                        loss=last_result.get("loss"),
                        kl=last_result.get("kl"),
                        clip_fraction=last_result.get("clip_fraction"),
                        grad_norm=last_result.get("grad_norm"),
                        train_tokens=last_result.get("tokens"),
                        adapter_version=last_result.get("adapter_version"),
                        trainer_step=last_result.get("step"),
                        duplicate=last_result.get("duplicate", False),
                        grpo_seconds=round(time.perf_counter() - grpo_started, 3),
                    )
                    if ctx.telemetry is not None:
                        ctx.telemetry.train_steps.inc()
                        if last_result.get("adapter_version") is not None:
                            ctx.telemetry.adapter_version.set(last_result["adapter_version"])
                else:  # no tree, or every path scored the same: nothing to learn from this batch
                    metrics.update(skipped=True, kl=None, loss=None)
                metrics["tokens"] = (metrics["search_tokens"] or 0) + int(metrics.get("train_tokens") or 0)
                if request.eval_every and (step % request.eval_every == 0 or step == total_steps):
                    metrics.update(await _quick_eval(ctx, request))
                    await watch.check()  # the eval asked the student: a restart during it spoils the figures
                metrics["step_seconds"] = round(time.perf_counter() - step_started, 3)
                if ctx.telemetry is not None and metrics.get("mean_reward") is not None:
                    ctx.telemetry.step_mean_reward.set(metrics["mean_reward"])

                await ctx.store.record_step(ctx.job_id, step, metrics)
                problems_this_run += len(batch)
                elapsed = time.perf_counter() - run_started
                await ctx.set_metrics(**{k: v for k, v in metrics.items() if k != "degraded"}, step=step)
                await ctx.emit("step", step=step, total_steps=total_steps, **metrics)
                wandb.log(step, metrics)
                if step % request.checkpoint_every == 0 or step == total_steps:
                    checkpoint = await _save_checkpoint(ctx, watch, step)
                await ctx.set_progress(
                    step=step,
                    problems_done=first_tree + len(batch),
                    problems_per_min=round(60 * problems_this_run / elapsed, 3),
                )
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
        wandb.finish()

    train_seconds = time.perf_counter() - run_started
    steps = await ctx.store.steps(ctx.job_id)
    plot = await asyncio.to_thread(
        plots.train_curves_png, steps, ctx.path("curves.png"), f"train job {ctx.job_id}"
    )
    health = await watch.health()
    return {
        "steps": total_steps,
        "applied_steps": sum(1 for s in steps if not s.get("skipped")),
        "adapter_version_start": adapter_start,
        "adapter_version": health.get("adapter_version"),
        "checkpoint": checkpoint,
        "trees_dir": str(ctx.job_dir / "trees"),
        "trees": sum(len(b) for b in batches),
        "plot": str(plot),
        "train_seconds_this_run": round(train_seconds, 2),
        "problems_this_run": problems_this_run,
        "problems_per_min": round(60 * problems_this_run / train_seconds, 3) if train_seconds > 0 else None,
        "resumed_from_step": start_step if ctx.resumed else None,
        "trainer_restarts": restarts,
        "degraded": degraded,
    }
