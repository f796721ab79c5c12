"""Does the student learn? Base vs trained accuracy on held-out GSM8K, with ablations, through the REST API.

    python bench/learning.py --eval-examples 500 --train-examples 256 --arms mcts,grpo,mcts_tree,legacy

1. start the trainer service and the orchestrator on free ports of 127.0.0.1 (or use running ones: --url);
2. save the fresh adapter as trainer checkpoint "learning-init" (adapter + optimizer state);
3. POST /eval of the "base" model (adapters off) on test problems [eval_offset, eval_offset + n), greedy;
4. for every arm: load "learning-init", POST /train (same train problems, batch, epochs, loss and token
   budget for every arm), POST /eval of the "student" on the same test problems; McNemar's exact p-value of
   the paired results against the base, for strict (`#### N`) and flexible (last number) answers;
5. write the figures (--json-out), accuracy vs training step for every arm (--png-out), every arm run to an
   append-only log (--runs-log) and, with --results-md, one row per arm into the `## learning` section.

Arms (built on one shared request, so only what the arm is about differs):
- mcts:      the product: MCTS with teacher children ("right" and "wrong"), flat (GRPO) group advantages;
- mcts_tree: the same trees, tree advantages (V(node) - V(parent) per step);
- grpo:      no tree: one expansion of `group` whole student answers (one_line_steps=false, max_depth 1, no
             teachers, no rollouts), z-scored rewards: plain GRPO;
- legacy:    the same trees as mcts, the original's reward-weighted SFT loss (loss.type="legacy");
- guided:    the search cut to one expansion of whole answers (one_line_steps=false, max_depth 1): `group` - 1
             student answers and one greedy "right" teacher answer (shown the gold solution with
             --teacher-reference), z-scored together; the grpo arm with a teacher in the group, at the
             same number of answers per problem.
`--arm NAME=JSON` adds an arm: JSON is deep-merged over the mcts request (e.g. a learning-rate sweep).

The state (base rows, finished arms) is kept in <workdir>/learning_state.json, so a run cut short can be run
again with the same --workdir and goes on with the arms not yet done (--arms picks a subset).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx

from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.local.demo import default_gsm8k_path
from orchestrator.local.machine import describe_machine
from orchestrator.local.processes import free_port, orchestrator_process, trainer_process
from orchestrator.gsm8k.stats import accuracy, compare_paired

INIT_CHECKPOINT = "learning-init"
DEFAULT_ARMS = "mcts,grpo,mcts_tree,legacy,guided"


# --- requests of the arms ----------------------------------------------------------------------------------
def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def product_request(args) -> dict:
    """The mcts arm's POST /train body; every other arm is this with a few fields changed."""
    loss = {
        "type": "grpo",
        "beta": args.beta,
        "learning_rate": args.learning_rate,
        "micro_batch_size": args.micro_batch,
    }
    search = {
        "iterations": args.iterations,
        "max_depth": args.max_depth,
        "chunk_tokens": args.chunk_tokens,
        "max_tokens": args.max_tokens,
        "n_student": args.n_student,
        "n_teacher_right": args.n_teacher_right,
        "n_teacher_wrong": args.n_teacher_wrong,
        "parallel_simulations": args.parallel_simulations,
        "rollout": args.rollout_max_tokens > 0,
        "rollout_max_tokens": max(1, args.rollout_max_tokens),
        "use_checker": args.use_checker,
        "teacher_reference": args.teacher_reference,
        "temperature": args.temperature,
        "rewards": {"pre": args.pre_weight, "hre": args.hre_weight},
        "seed": args.seed,
    }
    return {
        "split": "train",
        "offset": args.train_offset,
        "num_examples": args.train_examples,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "search": search,
        "loss": loss,
        "advantage_mode": args.advantage_mode,
        "teacher_weight": args.teacher_weight,
        "checkpoint_every": 1000,
        "eval_every": args.curve_every,
        "eval_examples": args.curve_examples,
        "eval_max_tokens": args.eval_max_tokens,
        "eval_concurrency": min(args.eval_concurrency, 256),
        "trees_in_flight": args.trees_in_flight,
    }


def arm_requests(args) -> dict[str, dict]:
    """Every known arm's request, the extra --arm ones included."""
    product = product_request(args)
    grpo_search = {
        "iterations": 1,
        "parallel_simulations": 1,
        "max_depth": 1,
        "n_student": args.group,
        "n_teacher_right": 0,
        "n_teacher_wrong": 0,
        "one_line_steps": False,
        "chunk_tokens": args.max_tokens,
        "rollout": False,
        "use_checker": False,
        "teacher_reference": False,
    }
    guided_search = {
        **grpo_search,
        "n_student": max(args.group - 1, 1),
        "n_teacher_right": 1,
        "teacher_reference": args.teacher_reference,
        "teacher_temperature": 0.0,  # one teacher answer per problem: its most likely one
    }
    arms = {
        "mcts": product,
        "mcts_tree": deep_merge(product, {"advantage_mode": "tree"}),
        "grpo": deep_merge(product, {"search": grpo_search}),
        "legacy": deep_merge(product, {"loss": {"type": "legacy"}}),
        "guided": deep_merge(product, {"search": guided_search}),
    }
    for spec in args.arm or []:
        name, _, body = spec.partition("=")
        arms[name] = deep_merge(product, json.loads(body))
    return arms


def teacher_env(args, trainer_url: str) -> dict[str, str]:
    """The orchestrator's teacher: the embedded tier's "base" model, or (--teacher-model student) the student
    itself, as in STaR's rationalization: shown the gold solution, the model being trained writes the answer
    it learns from. With one model the student's and the teacher's requests also share decode batches."""
    if args.teacher_model == "base":
        return {}
    teacher = {
        "name": "student-with-reference",
        "base_url": f"{trainer_url}/v1",
        "model": "student",
        "max_concurrency": args.max_requests_in_flight,
        "timeout_s": args.request_timeout,
    }
    return {"TEACHER_TIER": "custom", "TEACHERS": json.dumps([teacher])}


# --- one run of the services -------------------------------------------------------------------------------
def paired(base_rows: list[dict], rows: list[dict], kind: str) -> dict:
    """McNemar of base vs trained on the problems both answered (the same held-out set)."""
    base = {r["problem_id"]: r for r in base_rows}
    ids = [r["problem_id"] for r in rows if r["problem_id"] in base]
    by_id = {r["problem_id"]: r for r in rows}
    return compare_paired(
        [base[i][f"{kind}_correct"] for i in ids], [by_id[i][f"{kind}_correct"] for i in ids]
    )


def run_eval(client: OrchestratorClient, model: str, args, log) -> tuple[list[dict], float]:
    started = time.perf_counter()
    job_id = client.eval(
        split="test",
        offset=args.eval_offset,
        num_examples=args.eval_examples,
        models=[model],
        max_tokens=args.eval_max_tokens,
        concurrency=args.eval_concurrency,
    )
    job = client.wait(job_id, timeout_s=args.job_timeout, poll_s=1.0)
    if job["status"] != "completed":
        raise RuntimeError(f"eval of {model}: {job['status']} {job.get('error')}")
    rows = client.results(job_id)
    seconds = time.perf_counter() - started
    log(
        f"eval {model}: strict {accuracy([r['strict_correct'] for r in rows]):.1%} flexible "
        f"{accuracy([r['flexible_correct'] for r in rows]):.1%} on {len(rows)} ({seconds:.0f}s)"
    )
    return rows, seconds


def curve(steps: list[dict], base_rows: list[dict], curve_examples: int) -> list[dict]:
    """Accuracy vs step: step 0 is the base on the curve's problems, then every quick eval of the job."""
    first = base_rows[:curve_examples]
    points = [
        {
            "step": 0,
            "strict": accuracy([r["strict_correct"] for r in first]),
            "flexible": accuracy([r["flexible_correct"] for r in first]),
        }
    ]
    for s in steps:
        m = s.get("metrics", s)
        if m.get("eval_strict_acc") is not None:
            points.append(
                {"step": s.get("step"), "strict": m["eval_strict_acc"], "flexible": m["eval_flexible_acc"]}
            )
    return points


def run_arm(client, trainer_url: str, name: str, request: dict, base_rows: list[dict], args, log) -> dict:
    started = time.perf_counter()
    httpx.post(
        f"{trainer_url}/checkpoints/load", json={"name": INIT_CHECKPOINT}, timeout=120
    ).raise_for_status()
    job_id = client.train(**request)
    log(f"arm {name}: POST /train -> {job_id}")
    cut_short = False
    try:
        job = client.wait(job_id, timeout_s=args.arm_train_s or args.job_timeout, poll_s=2.0)
    except TimeoutError:  # over the arm's time budget: stop it and judge the adapter as it is
        log(f"arm {name}: over --arm-train-s, cancelling the train job")
        client.cancel(job_id)
        job, cut_short = client.wait(job_id, timeout_s=300, poll_s=1.0), True
    if not cut_short and job["status"] != "completed":
        raise RuntimeError(f"train job of arm {name}: {job['status']} {job.get('error')}")
    train_s = time.perf_counter() - started
    steps = client.steps(job_id)
    rows, eval_s = run_eval(client, "student", args, log)
    strict, flexible = paired(base_rows, rows, "strict"), paired(base_rows, rows, "flexible")
    metrics = [s.get("metrics", s) for s in steps]
    result = {
        "name": name,
        "acc": strict["second_acc"],
        "acc_flexible": flexible["second_acc"],
        "p_value": strict["p_value"],
        "p_value_flexible": flexible["p_value"],
        "discordant_strict": [strict["only_first"], strict["only_second"]],
        "discordant_flexible": [flexible["only_first"], flexible["only_second"]],
        "n": strict["n"],
        "applied_steps": sum(1 for m in metrics if m.get("adapter_version") is not None),
        "cut_short": cut_short,
        "search_tokens": sum(int(m.get("search_tokens") or 0) for m in metrics),
        "train_tokens": sum(int(m.get("train_tokens") or 0) for m in metrics),
        "mean_reward": [m.get("mean_reward") for m in metrics],
        "correct_leaf_share": [m.get("correct_leaf_share") for m in metrics],
        "kl": [m.get("kl") for m in metrics],
        "search_seconds": [m.get("search_seconds") for m in metrics],
        "grpo_seconds": [m.get("grpo_seconds") for m in metrics],
        "step_seconds": [m.get("step_seconds") for m in metrics],
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "curve": curve(steps, base_rows, args.curve_examples),
        "request": request,
        "job_id": job_id,
    }
    log(
        f"arm {name}: strict {result['acc']:.1%} (p={result['p_value']:.3g}) flexible {result['acc_flexible']:.1%} "
        f"(p={result['p_value_flexible']:.3g}); {result['applied_steps']} steps, {result['search_tokens']} search "
        f"tokens, {train_s:.0f}s train"
    )
    return result


# --- outputs -----------------------------------------------------------------------------------------------
def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def figures(state: dict, args, command: str, wall_s: float) -> dict:
    """The machine-readable result: base vs --head (else the mcts arm, else the first arm run), ablations
    beside it."""
    base = state["base_rows"]
    arms = [state["arms"][a] for a in state["arm_order"] if a in state["arms"]]
    head = state["arms"].get(args.head) if args.head else None
    head = head or state["arms"].get("mcts") or (arms[0] if arms else None)
    return {
        "n": len(base),
        "eval_split": "test",
        "eval_offset": args.eval_offset,
        "base_acc": accuracy([r["strict_correct"] for r in base]),
        "base_acc_flexible": accuracy([r["flexible_correct"] for r in base]),
        "trained_arm": head["name"] if head else None,
        "trained_acc": head["acc"] if head else None,
        "trained_acc_flexible": head["acc_flexible"] if head else None,
        "p_value": head["p_value"] if head else None,
        "p_value_flexible": head["p_value_flexible"] if head else None,
        "ablations": [
            {
                k: a[k]
                for k in (
                    "name",
                    "acc",
                    "acc_flexible",
                    "p_value",
                    "p_value_flexible",
                    "discordant_strict",
                    "discordant_flexible",
                    "applied_steps",
                    "cut_short",
                    "search_tokens",
                    "train_tokens",
                    "train_seconds",
                )
            }
            for a in arms
        ],
        "machine": describe_machine() + (f", GPU {g}" if (g := gpu_name()) else ", no GPU"),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "wall_s": round(wall_s, 1),
        "curves": {a["name"]: a["curve"] for a in arms},
        "requests": {a["name"]: a["request"] for a in arms},
    }


def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("strict", "flexible")):
        colors = {}
        for name, points in result["curves"].items():
            (line,) = ax.plot(
                [p["step"] for p in points], [100 * p[kind] for p in points], marker="o", label=name
            )
            colors[name] = line.get_color()
        key = "acc" if kind == "strict" else "acc_flexible"
        for arm in result["ablations"]:  # the final held-out accuracy (all n problems) after the arm's steps
            ax.plot(
                [arm["applied_steps"]],
                [100 * arm[key]],
                marker="x",
                markersize=10,
                linestyle="none",
                color=colors.get(arm["name"]),
                label=f"{arm['name']} held-out (n={result['n']})",
            )
        base = result["base_acc" if kind == "strict" else "base_acc_flexible"]
        ax.axhline(100 * base, color="grey", linestyle=":", label=f"base held-out (n={result['n']})")
        ax.set_title(f"{kind} accuracy (o: quick eval, x: held-out)")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% correct")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"GSM8K test, base = step 0; final held-out n={result['n']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_rows(result: dict) -> list[str]:
    rows = []
    for a in result["ablations"]:
        rows.append(
            f"| {result['date'][:16]} | {a['name']} | {result['n']} | {result['base_acc']:.1%} / "
            f"{result['base_acc_flexible']:.1%} | {a['acc']:.1%} / {a['acc_flexible']:.1%} | "
            f"{a['p_value']:.3g} / {a['p_value_flexible']:.3g} | {a['applied_steps']} | {a['train_seconds']:.0f} s | "
            f"{result['machine']} | `{result['command']}` |"
        )
    return rows


RESULTS_HEADER = (
    "| date (UTC) | arm | n | base strict / flexible | trained strict / flexible | McNemar p strict / flexible "
    "| steps | train time | machine | command |\n|---|---|---:|---|---|---|---:|---:|---|---|"
)


def add_results_rows(md_path: Path, rows: list[str]) -> None:
    """Append rows to the table of the `## learning` section (made if missing); other sections untouched."""
    text = md_path.read_text() if md_path.exists() else ""
    lines = text.splitlines()
    try:
        start = lines.index("## learning")
    except ValueError:
        lines += ["", "## learning", "", RESULTS_HEADER]
        start = len(lines) - 4 + 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_row = max((i for i in range(start, end) if lines[i].startswith("|")), default=None)
    if last_row is None:
        lines[end:end] = ["", *RESULTS_HEADER.splitlines()]
        last_row = end + 2
    lines[last_row + 1 : last_row + 1] = rows
    md_path.write_text("\n".join(lines) + "\n")


# --- main --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--arms", default=DEFAULT_ARMS, help=f"comma-separated arms to run, in order (default {DEFAULT_ARMS})")
    a("--arm", action="append", help="extra arm NAME=JSON, deep-merged over the mcts request")
    a("--head", default=None, help="the arm reported as trained_acc/p_value in --json-out (default: mcts)")
    a("--workdir", default="runs/learning", help="services' files and the resumable state")
    a("--fresh", action="store_true", help="forget the state in --workdir (base eval and finished arms)")
    a(
        "--url",
        default=None,
        help="use a running orchestrator instead of starting services (needs --trainer-url)",
    )
    a("--trainer-url", default=None)
    # held-out eval
    a("--eval-examples", type=int, default=300, help="held-out GSM8K test problems")
    a("--eval-offset", type=int, default=0)
    a("--eval-max-tokens", type=int, default=256)
    a("--eval-concurrency", type=int, default=64)
    a("--curve-every", type=int, default=4, help="quick student eval every N steps (the PNG)")
    a("--curve-examples", type=int, default=100, help="first N held-out problems in the quick eval")
    # training (the same for every arm)
    a("--train-examples", type=int, default=128)
    a("--train-offset", type=int, default=0)
    a("--epochs", type=int, default=1)
    a("--batch-size", type=int, default=8, help="problems per GRPO step")
    a("--trees-in-flight", type=int, default=None)
    a("--learning-rate", type=float, default=2e-4)
    a("--beta", type=float, default=0.01, help="KL coefficient")
    a("--micro-batch", type=int, default=16)
    a("--teacher-weight", type=float, default=1.0, help="loss weight of items with teacher-written text")
    a(
        "--advantage-mode",
        choices=("flat", "rejection"),
        default="flat",
        help="of every arm but mcts_tree: z-scored group advantages, or fine-tuning on the correct paths only",
    )
    a("--pre-weight", type=float, default=0.1, help="reward weight of the process reward (PRE)")
    a("--hre-weight", type=float, default=1.0, help="reward weight of the correct final answer")
    # search
    a("--iterations", type=int, default=8)
    a("--max-depth", type=int, default=6)
    a("--chunk-tokens", type=int, default=64)
    a("--max-tokens", type=int, default=256, help="token budget of one path (and of a grpo answer)")
    a("--rollout-max-tokens", type=int, default=192)
    a("--parallel-simulations", type=int, default=4)
    a("--n-student", type=int, default=2)
    a("--n-teacher-right", type=int, default=1)
    a("--n-teacher-wrong", type=int, default=1)
    a("--use-checker", action=argparse.BooleanOptionalAction, default=False)
    a(
        "--teacher-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the 'right' teacher sees the gold solution (search.teacher_reference)",
    )
    a(
        "--teacher-model",
        choices=("base", "student"),
        default="base",
        help="the teacher the services start with: the trainer's base model, or the student itself",
    )
    a("--temperature", type=float, default=0.8)
    a("--group", type=int, default=8, help="answers per problem in the grpo and guided arms")
    a(
        "--seed",
        type=int,
        default=None,
        help="seeded sampling (reproducible, but each row samples alone: slow)",
    )
    # services and outputs
    a("--request-timeout", type=float, default=900.0)
    a("--max-requests-in-flight", type=int, default=256)
    a("--job-timeout", type=float, default=7200.0)
    a("--arm-train-s", type=float, default=None, help="cancel an arm's train job after this many seconds")
    a(
        "--deadline-s",
        type=float,
        default=None,
        help="start no arm that the last arm's time says would end later",
    )
    a("--json-out", default="bench/results/learning.json")
    a("--png-out", default="bench/results/learning.png")
    a("--runs-log", default="bench/results/learning_runs.json", help="every arm run, appended")
    a("--results-md", default=None, help="append a row per arm to the `## learning` section of this file")
    a("--tag", default="", help="a label stored with every run in --runs-log")
    return p.parse_args(argv)


def append_runs_log(path: Path, entry: dict) -> None:
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    command = "python bench/learning.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / "learning_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() and not args.fresh else {}
    key = {
        "eval_examples": args.eval_examples,
        "eval_offset": args.eval_offset,
        "eval_max_tokens": args.eval_max_tokens,
    }
    if state.get("key") != key:
        state = {"key": key, "base_rows": None, "arms": {}, "arm_order": []}

    def log(message: str) -> None:
        print(f"[learning {time.perf_counter() - started:6.0f}s] {message}", flush=True)

    requests = arm_requests(args)
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in requests]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {sorted(requests)}")

    services = []
    if args.url:
        url, trainer_url = args.url, args.trainer_url
    else:
        env = {
            "TEACHER_TIER": "embedded",
            "REQUEST_TIMEOUT_S": str(args.request_timeout),
            "ENDPOINT_MAX_CONCURRENCY": str(args.max_requests_in_flight),
            "MAX_REQUESTS_IN_FLIGHT": str(args.max_requests_in_flight),
            "MAX_TREES_IN_FLIGHT": str(args.trees_in_flight or args.batch_size),
            # The trainer must take what the orchestrator keeps in flight (plus the quick evals beside it).
            "TRAINER_MAX_REQUESTS_IN_FLIGHT": str(max(256, 2 * args.max_requests_in_flight)),
        }
        if gsm8k := default_gsm8k_path():
            env["GSM8K_PATH"] = gsm8k
        trainer = trainer_process(free_port(), workdir, env=env, cwd=REPO_ROOT)
        orch_env = {**env, **teacher_env(args, trainer.url)}
        orch = orchestrator_process(free_port(), trainer.url, workdir, env=orch_env, cwd=REPO_ROOT)
        services = [orch, trainer]
        url, trainer_url = orch.url, trainer.url
    try:
        for s in reversed(services):
            s.start()
        if services:
            services[1].wait_ready(timeout_s=900, ok=lambda body: body.get("status") == "ok")
            services[0].wait_ready(timeout_s=120)
            log("services ready")
        with OrchestratorClient(url, timeout_s=120) as client:
            httpx.post(
                f"{trainer_url}/checkpoints", json={"name": INIT_CHECKPOINT}, timeout=120
            ).raise_for_status()
            if state["base_rows"] is None:
                state["base_rows"], state["base_seconds"] = run_eval(client, "base", args, log)
                state_path.write_text(json.dumps(state))
            last_arm_s = None
            for name in wanted:
                if name in state["arms"] and state["arms"][name]["request"] == requests[name]:
                    log(f"arm {name}: done before, kept")
                    continue
                elapsed = time.perf_counter() - started
                if args.deadline_s and last_arm_s and elapsed + last_arm_s > args.deadline_s:
                    log(f"arm {name}: skipped, {elapsed:.0f}s + ~{last_arm_s:.0f}s would pass --deadline-s")
                    continue
                arm_started = time.perf_counter()
                result = run_arm(client, trainer_url, name, requests[name], state["base_rows"], args, log)
                last_arm_s = time.perf_counter() - arm_started
                state["arms"][name] = result
                state["arm_order"] = [a for a in state["arm_order"] if a != name] + [name]
                state_path.write_text(json.dumps(state))
                append_runs_log(
                    Path(args.runs_log),
                    {
                        "tag": args.tag,
                        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "command": command,
                        "n": len(state["base_rows"]),
                        "base_acc": accuracy([r["strict_correct"] for r in state["base_rows"]]),
                        "base_acc_flexible": accuracy([r["flexible_correct"] for r in state["base_rows"]]),
                        "machine_gpu": gpu_name(),
                        **{k: v for k, v in result.items() if k != "curve"},
                    },
                )
    finally:
        for s in services:
            s.stop()

    result = figures(state, args, command, time.perf_counter() - started)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    plot_curves(result, Path(args.png_out))
    if args.results_md:
        add_results_rows(Path(args.results_md), results_rows(result))
    log(f"base strict {result['base_acc']:.1%} flexible {result['base_acc_flexible']:.1%} (n={result['n']})")
    for a in result["ablations"]:
        log(
            f"  {a['name']:<10} strict {a['acc']:.1%} p={a['p_value']:.3g}   flexible {a['acc_flexible']:.1%} "
            f"p={a['p_value_flexible']:.3g}   steps {a['applied_steps']}"
        )
    log(f"wrote {args.json_out}, {args.png_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
