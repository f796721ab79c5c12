"""Evaluation on GSM8K: greedy chat answers, strict and flexible extraction, base vs student.

Every (problem, model) pair is one greedy chat completion of `question_messages(problem)`. The answer is
judged twice: strict (the number on the last `#### ` line) and flexible (the last number in the text), both
compared numerically with the gold answer. With both models asked on the same problems the report adds
McNemar's exact p-value of the paired results (orchestrator.gsm8k.stats). Requests go out concurrently so the
trainer can merge them into shared forward batches.

With a student server (STUDENT_URL) both models are asked there: "student" under the trainer's current adapter
version (published first), "base" as the server's base model ("<STUDENT_MODEL>-base"), so a comparison of the
two differs by the adapter only, not by the trainer's 4-bit base against the server's bf16 one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from orchestrator.clients.llm import Completion, LLMError, LLMPool
from orchestrator.clients.student_adapters import StudentAdapters, StudentServerError
from orchestrator.gsm8k.answers import extract_flexible, extract_strict, same_number
from orchestrator.gsm8k.data import Problem, load_gsm8k, question_messages, read_split
from orchestrator.gsm8k.stats import accuracy, compare_paired
from orchestrator.runners.context import JobContext
from orchestrator.runners.student_server import StudentServer
from orchestrator.settings import EndpointSpec, Settings


def model_endpoints(settings: Settings, adapters: StudentAdapters | None = None) -> dict[str, EndpointSpec]:
    """ "student" = the current adapter, "base" = the same model, adapters off (both on the trainer); with
    `adapters`, both on the student server: "student" under the current version's name (set per request),
    "base" as its base model."""
    server = settings.student_server() if adapters is not None else None
    if server is None:
        trainer = settings.student_endpoint()
        return {"student": trainer, "base": trainer.model_copy(update={"name": "base", "model": "base"})}
    base = server.model_copy(
        update={"name": "student-server-base", "model": f"{settings.student_model}-base"}
    )
    return {"student": server, "base": base}


def judge(problem: Problem, model: str, text: str) -> dict[str, Any]:
    strict, flexible = extract_strict(text), extract_flexible(text)
    return {
        "problem_id": problem.id,
        "model": model,
        "gold": problem.answer,
        "strict_pred": strict,
        "flexible_pred": flexible,
        "strict_correct": same_number(strict, problem.answer),
        "flexible_correct": same_number(flexible, problem.answer),
        "output": text,
    }


async def answer_all(
    problems: Sequence[Problem],
    models: Sequence[str],
    pool: LLMPool,
    endpoints: dict[str, EndpointSpec],
    max_tokens: int,
    concurrency: int,
    on_answer: Callable[[dict], Awaitable[None]] | None = None,
    adapters: StudentAdapters | None = None,
) -> list[dict]:
    """One greedy answer per (problem, model); rows in problem order, models interleaved. With `adapters` the
    "student" model is asked under the student server's current version."""
    limit = asyncio.Semaphore(concurrency)

    async def ask(problem: Problem, model: str) -> Completion:
        messages, params = question_messages(problem), {"max_tokens": max_tokens, "temperature": 0.0}
        if model == "student" and adapters is not None:
            return await adapters.chat(pool, endpoints[model], messages, **params)
        return await pool.chat(endpoints[model], messages, **params)

    async def one(problem: Problem, model: str) -> dict:
        async with limit:
            started = time.perf_counter()
            try:
                completion = await ask(problem, model)
                choice = completion.choices[0]
                row = judge(problem, model, choice.text)
                row.update(
                    finish_reason=choice.finish_reason,
                    completion_tokens=int(completion.usage.get("completion_tokens", 0) or 0),
                    adapter_version=completion.adapter_version,
                    error=None,
                )
            except (LLMError, StudentServerError) as exc:  # one failed answer counts as wrong, reported
                row = judge(problem, model, "")
                row.update(finish_reason=None, completion_tokens=0, adapter_version=None, error=str(exc))
            row["seconds"] = round(time.perf_counter() - started, 3)
        if on_answer is not None:
            await on_answer(row)
        return row

    return list(await asyncio.gather(*(one(p, m) for p in problems for m in models)))


def build_report(rows: Sequence[dict], models: Sequence[str]) -> dict[str, Any]:
    """Accuracies per model and, for base vs student, the paired comparison. Pure function of the rows."""
    by_model = {m: [r for r in rows if r["model"] == m] for m in models}
    report: dict[str, Any] = {"n": len(by_model[models[0]]), "models": {}}
    for model, mrows in by_model.items():
        report["models"][model] = {
            "n": len(mrows),
            "strict_correct": sum(r["strict_correct"] for r in mrows),
            "flexible_correct": sum(r["flexible_correct"] for r in mrows),
            "strict_acc": accuracy([r["strict_correct"] for r in mrows]),
            "flexible_acc": accuracy([r["flexible_correct"] for r in mrows]),
            "errors": sum(1 for r in mrows if r.get("error")),
            "completion_tokens": sum(r.get("completion_tokens", 0) for r in mrows),
            "adapter_version": max(
                (r["adapter_version"] for r in mrows if r.get("adapter_version") is not None), default=None
            ),
        }
    if "base" in by_model and "student" in by_model:
        base = {r["problem_id"]: r for r in by_model["base"]}
        student = {r["problem_id"]: r for r in by_model["student"]}
        ids = [pid for pid in base if pid in student]
        report["comparison"] = {
            kind: {
                **(
                    c := compare_paired(
                        [base[i][f"{kind}_correct"] for i in ids],
                        [student[i][f"{kind}_correct"] for i in ids],
                    )
                ),
                "base_acc": c["first_acc"],
                "student_acc": c["second_acc"],
                "only_base": c["only_first"],
                "only_student": c["only_second"],
            }
            for kind in ("strict", "flexible")
        }
    return report


def accuracy_table(report: dict[str, Any]) -> str:
    """The report as a small text table (used by the CLI and the HTML report)."""
    lines = [f"{'model':<10} {'strict':>8} {'flexible':>9}   (n={report['n']})"]
    for model, m in report["models"].items():
        lines.append(f"{model:<10} {m['strict_acc']:>8.1%} {m['flexible_acc']:>9.1%}")
    if "comparison" in report:
        s, f = report["comparison"]["strict"], report["comparison"]["flexible"]
        lines.append(
            f"{'McNemar p':<10} {s['p_value']:>8.3f} {f['p_value']:>9.3f}"
            f"   (discordant strict {s['only_base']}/{s['only_student']}, "
            f"flexible {f['only_base']}/{f['only_student']} base-only/student-only)"
        )
    return "\n".join(lines)


async def quick_eval(
    pool: LLMPool,
    settings: Settings,
    examples: int,
    max_tokens: int,
    concurrency: int,
    adapters: StudentAdapters | None = None,
) -> dict[str, float]:
    """The student's accuracy on the first `examples` test problems (greedy): a train job's curves."""
    problems = await asyncio.to_thread(load_gsm8k, "test", settings.gsm8k_path, examples, 0)
    rows = await answer_all(
        problems,
        ["student"],
        pool,
        model_endpoints(settings, adapters),
        max_tokens,
        concurrency=concurrency,
        adapters=adapters,
    )
    student = build_report(rows, ["student"])["models"]["student"]
    return {"eval_strict_acc": student["strict_acc"], "eval_flexible_acc": student["flexible_acc"]}


async def run_eval_job(ctx: JobContext) -> dict[str, Any]:
    """The eval job: answer, judge, write eval.jsonl + report.json + report.html/png, return the report."""
    from orchestrator.runners import plots  # matplotlib is loaded only when a job needs it

    req = ctx.request
    gsm8k = await asyncio.to_thread(read_split, req["split"], ctx.settings.gsm8k_path)
    problems = gsm8k.problems(req["num_examples"], req["offset"])
    models = req["models"]
    total = len(problems) * len(models)
    done = 0
    adapters = ctx.student_adapters
    if adapters is not None and "student" in models:  # the server answers under the version the trainer holds
        server = StudentServer(adapters, ctx.settings.student_wait_s, ctx.emit)
        await server.publish_trainer_version(await ctx.trainer.health())
    await ctx.set_progress(phase="answering", done=0, total=total, gsm8k=gsm8k.source.to_record())

    async def on_answer(row: dict) -> None:
        nonlocal done
        done += 1
        if ctx.telemetry is not None:
            ctx.telemetry.eval_answers.labels(model=row["model"]).inc()
        ctx.raise_if_cancelled()
        await ctx.emit(
            "answer",
            done=done,
            total=total,
            problem_id=row["problem_id"],
            model=row["model"],
            strict_correct=row["strict_correct"],
            flexible_correct=row["flexible_correct"],
        )
        if done % max(1, total // 20) == 0 or done == total:
            await ctx.store.update_job(ctx.job_id, progress={"done": done, "total": total})

    started = time.perf_counter()
    rows = await answer_all(
        problems,
        models,
        ctx.pool,
        model_endpoints(ctx.settings, adapters),
        req["max_tokens"],
        req["concurrency"],
        on_answer,
        adapters=adapters,
    )
    report = build_report(rows, models)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["split"], report["offset"] = req["split"], req["offset"]
    report["gsm8k"] = gsm8k.source.to_record()

    jsonl = ctx.path("eval.jsonl")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx.path("report.json").write_text(json.dumps(report, indent=2))
    png = await asyncio.to_thread(plots.eval_report_png, report, ctx.path("report.png"))
    html = ctx.path("report.html")
    html.write_text(plots.eval_report_html(report, rows, png.name))
    report["files"] = {"jsonl": str(jsonl), "png": str(png), "html": str(html)}
    await ctx.set_progress(phase="done", done=total, total=total)
    return report
