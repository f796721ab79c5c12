"""`azt demo`: the whole system on this machine, through its REST API, in a few minutes on a CPU.

1. start the trainer service (the tiny SmolLM2-135M student), the reference teacher (GSM8K train reference
   solutions over the OpenAI API, standing in for a 70B-class teacher; `--teacher embedded` uses the trainer's
   own "base" model instead, as the embedded tier does) and the orchestrator as real processes on free ports of
   127.0.0.1, with everything under runs/;
2. POST /train on the product's defaults (the training recipe: the fork search, dr_grpo, lr 5e-4, ...) in a
   smaller shape: a few GSM8K train problems, shorter answers, one GRPO step per batch;
3. POST /eval: base vs trained student, greedy, on held-out test problems;
4. print the accuracy table (strict, flexible, McNemar p), what it can and cannot show, and where the trees,
   checkpoints and plots are;
5. stop the services (also on Ctrl-C or an error).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.clients.job_progress import follow_with_bar
from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.local.machine import describe_machine
from orchestrator.local.processes import (
    ServiceProcess,
    free_port,
    orchestrator_process,
    reference_teacher_for_student,
    trainer_process,
)

REPO_ROOT = Path(__file__).resolve().parents[2]  # orchestrator/local/demo.py -> the checkout


TEACHERS = {
    "reference": "reference (GSM8K train reference solutions, a stand-in for a 70B-class teacher)",
    "embedded": "embedded (the trainer's own base model)",
}
GPU_FIGURE = "bench/RESULTS.md, section 'learning' (bench/results/learning.json, bench/results/learning.png)"


def print_table(train_job: dict, eval_job: dict, teacher: str) -> None:
    report = eval_job["result"]
    models = report["models"]
    base, student = models.get("base"), models.get("student")
    cmp = report.get("comparison", {})
    train = train_job["result"]
    print()
    print(
        f"GSM8K test, {report['n']} problems, greedy, chat template (student after {train['applied_steps']} "
        f"GRPO steps on {train['trees']} train problems, {train.get('generated_tokens', 0):,} generated tokens; "
        f"teacher: {TEACHERS[teacher]})"
    )
    print(f"  {'':<22}{'strict':>10}{'flexible':>10}")
    if base:
        print(f"  {'base':<22}{base['strict_acc']:>10.1%}{base['flexible_acc']:>10.1%}")
    if student:
        print(f"  {'trained (student)':<22}{student['strict_acc']:>10.1%}{student['flexible_acc']:>10.1%}")
    if cmp:
        print(
            f"  {'McNemar exact p':<22}{cmp['strict']['p_value']:>10.3f}{cmp['flexible']['p_value']:>10.3f}"
        )
    print(
        f"What this shows: the loop runs end to end on the training recipe's defaults (search, GRPO steps, "
        f"checkpoints, eval). What it cannot show: a gain. {train['applied_steps']} steps are far too few to move "
        f"the student, and {report['n']} problems too few to see a change of a few points (McNemar needs about "
        f"15 wins against 5 losses). The measured learning run: {GPU_FIGURE}."
    )
    print()


def train_request(args) -> dict:
    """The demo's POST /train: the product's defaults, in a smaller shape (only the shape is sent)."""
    request = {
        "num_examples": args.train_examples,
        "batch_size": args.batch_size,
        "checkpoint_every": 1,
        "search": {
            "root_samples": args.root_samples,
            "iterations": args.iterations,
            "n_student": args.n_student,
            "max_tokens": args.max_tokens,
        },
    }
    if args.learning_rate:
        request["loss"] = {"learning_rate": args.learning_rate}
    return request


def run_demo(args) -> int:
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]  # other work slows the demo down; the figures say how busy it was
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.workdir or Path("runs") / f"demo-{stamp}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Generous timeouts: on a busy 2-core machine one long answer can take minutes.
    env = {"TEACHER_TIER": "embedded", "REQUEST_TIMEOUT_S": str(args.request_timeout)}
    trainer_port = args.trainer_port or free_port()
    port = args.port or free_port()
    trainer = trainer_process(trainer_port, workdir, env=env, cwd=REPO_ROOT)
    services: list[ServiceProcess] = [trainer]
    print(f"demo: working in {workdir}")
    try:
        print(f"demo: starting the trainer on {trainer.url} (loads the tiny model; log {trainer.log_path})")
        trainer.start()
        trainer.wait_ready(timeout_s=600)  # the trainer's /health is 200 only once it serves (HealthResponse)
        if args.teacher == "reference":
            # Started once the trainer is up: its converted model has the tokenizer the teacher counts with.
            teacher = reference_teacher_for_student(free_port(), workdir, cwd=REPO_ROOT)
            services.append(teacher)
            teacher.start()
            teacher.wait_ready(timeout_s=300)
            endpoint = {"name": "reference", "base_url": teacher.url + "/v1", "model": "reference"}
            env.update(TEACHER_TIER="custom", TEACHERS=json.dumps([endpoint]))
        orchestrator = orchestrator_process(port, trainer.url, workdir, env=env, cwd=REPO_ROOT)
        services.append(orchestrator)
        orchestrator.start()
        orchestrator.wait_ready(timeout_s=120)
        ready_s = time.perf_counter() - started
        print(
            f"demo: services ready after {ready_s:.0f}s (teacher: {TEACHERS[args.teacher]}); "
            f"API docs at {orchestrator.url}/docs"
        )

        with OrchestratorClient(orchestrator.url, timeout_s=120) as client:
            train_id = client.train(**train_request(args))
            print(f"demo: POST /train -> job {train_id}")
            train_job = follow_with_bar(client, train_id)
            if train_job["status"] != "completed":
                raise RuntimeError(f"train job {train_job['status']}: {train_job['error']}")
            tree_svg = workdir / "tree-0.svg"
            tree_svg.write_text(client.tree(train_id, 0, format="svg"))

            eval_id = client.eval(
                num_examples=args.eval_examples,
                models=["base", "student"],
                max_tokens=args.eval_max_tokens,
                concurrency=args.eval_concurrency,
            )
            print(f"demo: POST /eval -> job {eval_id}")
            eval_job = follow_with_bar(client, eval_id)
            if eval_job["status"] != "completed":
                raise RuntimeError(f"eval job {eval_job['status']}: {eval_job['error']}")
    except BaseException:
        logs = ", ".join(str(s.log_path) for s in services)
        print(f"demo: failed; logs in {logs}", file=sys.stderr)
        raise
    finally:
        for service in reversed(services):
            service.stop()

    wall_s = time.perf_counter() - started
    train = train_job["result"]
    print_table(train_job, eval_job, args.teacher)
    gsm8k = train["gsm8k"]
    print(f"GSM8K:         {gsm8k['source']} {gsm8k['location']} ({gsm8k['reason']})")
    print(f"search trees:  {train['trees_dir']}  (picture of tree 0: {tree_svg})")
    print(f"checkpoints:   {train['checkpoint'].get('path') or workdir / 'trainer' / 'checkpoints'}")
    print(f"train curves:  {train['plot']}")
    files = eval_job["result"]["files"]
    print(f"eval report:   {files['html']}  (per problem: {files['jsonl']})")
    print(
        f"adapter version {train['adapter_version_start']} -> {train['adapter_version']}; "
        f"training {train['problems_per_min']:.2f} problems/min; demo wall time {wall_s:.0f}s"
    )

    if args.json_out:
        models = eval_job["result"]["models"]
        figures = {
            "wall_s": round(wall_s, 1),
            "ready_s": round(ready_s, 1),
            "train_problems_per_min": train["problems_per_min"],
            "train_problems": train["trees"],
            "train_steps": train["applied_steps"],
            "train_seconds": train["train_seconds_this_run"],
            "generated_tokens": train.get("generated_tokens"),
            "teacher": TEACHERS[args.teacher],
            "train_request": train_request(args),
            "eval_problems": eval_job["result"]["n"],
            "eval_seconds": eval_job["result"]["seconds"],
            "base_acc": models["base"]["strict_acc"],
            "trained_acc": models["student"]["strict_acc"],
            "base_acc_flexible": models["base"]["flexible_acc"],
            "trained_acc_flexible": models["student"]["flexible_acc"],
            "p_value_strict": eval_job["result"]["comparison"]["strict"]["p_value"],
            "p_value_flexible": eval_job["result"]["comparison"]["flexible"]["p_value"],
            "adapter_version_start": train["adapter_version_start"],
            "adapter_version_end": train["adapter_version"],
            "machine": describe_machine(),
            "load_avg_1m_start": round(load_at_start, 2),
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "azt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures:       {args.json_out}")
    return 0
