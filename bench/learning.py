"""Does the student learn? Base vs trained on all 1,319 GSM8K test problems, arms at equal generated tokens,
through the REST API, in pieces that resume.

    python bench/learning.py --token-budget 1200000 --arms mcts,grpo,mcts_tree,sft_gold --piece-s 480
    python bench/learning.py --dev --arms mcts,lr2e-4 --arm 'lr2e-4={"loss":{"learning_rate":2e-4}}' ...

1. start the trainer service, the reference teacher (orchestrator/reference_teacher/: writes from the GSM8K
   train reference solutions, standing in for a 70B-class teacher; `--teacher base|student` for a model
   teacher instead) and the orchestrator on free ports of 127.0.0.1;
2. save the fresh adapter as trainer checkpoint "learning-init" (once per run);
3. judge the "base" model (adapters off) greedily on the held-out problems, as `--eval-chunks` eval jobs at
   once: the GSM8K test problems [eval_offset, eval_offset + n), n = 1,319 by default; with `--dev` the last
   `--dev-examples` (500) GSM8K train problems instead, which no arm trains on (tuning never touches test);
4. for every arm: load "learning-init", POST /train with `max_generated_tokens` = `--token-budget` (the job
   stops after the step that reaches it: the student's and the teachers' generated tokens, every step counted,
   and saves that step's checkpoint); save the adapter, judge it on the same problems;
5. write bench/results/learning.json (learning_dev.json with --dev), the learning curve PNG and an append-only
   log of arm runs.

Every answer is judged three ways: ours (strict `#### N`, flexible last number, numeric comparison), and the
lm-evaluation-harness gsm8k task's extraction beside it (lm_eval/tasks/gsm8k/gsm8k.yaml, version 3:
strict-match `#### (\\-?[0-9\\.\\,]+)` first match, flexible-extract `(-?[$0-9.,]{2,})|(-?[0-9]+)` last match;
`,` `$` and a trailing `.` removed, then an exact string match with the gold number), so figures compare with
published ones (which also differ in prompt: lm-eval asks 5-shot "Question: ... Answer:", we ask the chat
template zero-shot). McNemar's exact p of every arm against the base, for each extraction.

Arms (only what the arm is about is set; everything else is the product's default, so `mcts` is what
`POST /train` does with no search or loss overrides: the fork search, dr_grpo, lr 5e-4, ...):
- mcts:      the product's defaults with the configured teacher;
- mcts_tree: the same with tree advantages (advantage_mode "tree");
- grpo:      no tree: per problem `--group` whole student answers (the fork search's round 0 alone), no
             teachers, no gold answer: plain GRPO on the student's samples, same loss;
- sft_gold:  the reference solutions through the same POST /train and /grpo/step: per problem the "right"
             teacher's whole answer (the fork search's gold answer) and no student sample, advantage_mode
             "rejection" (fine-tuning on the correct paths), teacher weight 1: the supervised ceiling (needs
             `--teacher reference`);
- legacy:    the mcts arm with the reward-weighted SFT loss (an ablation);
- mcts_group: the mcts arm with teacher_paths "group": teacher-written paths as members of the group, whole
             paths, A = R - mean over all (phase 2's rule, which made the student worse in session 4's H200 run).
`--arm NAME=JSON` adds an arm: JSON deep-merged over the mcts request (e.g. another learning rate). Flags such as
--learning-rate or --iterations override the product's defaults in every arm (left out, they are not sent).

The learning curve: the train job's own quick eval (`eval_every` = --curve-every steps) on the first
--curve-examples test problems gives accuracy against the generated tokens of the steps before it; the base
is the point at 0 tokens and each arm's final judgement (on the same problems) its last point. With --dev the
job's quick eval (test problems) is off: the curve has the base and the final points only.

Pieces. `--piece-s S` ends this call after S seconds: a running train job is cancelled (the orchestrator can
resume it: it rewinds the trainer to the job's last checkpoint, `checkpoint_every` steps), unfinished eval chunks
are dropped, everything done is kept in <workdir>/learning_state.json, and the call exits with code 3. The next
call with the same --workdir goes on where this one stopped (the trainer's checkpoints and the orchestrator's
job store live in the workdir). Exit code 0: every arm judged. The JSON says how many pieces and minutes of
wall time (`gpu_minutes` on a GPU machine) the run took.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx

from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.gsm8k.stats import accuracy, compare_paired
from orchestrator.local.machine import describe_machine
from orchestrator.local.processes import (
    free_port,
    orchestrator_process,
    reference_teacher_for_student,
    trainer_process,
)
from orchestrator.runners.requests import GSM8K_TEST_SIZE, GSM8K_TRAIN_SIZE

INIT_CHECKPOINT = "learning-init"
DEFAULT_ARMS = "mcts,grpo,mcts_tree,sft_gold"
PIECE_EXIT = 3  # "more to do: run again with the same --workdir"
TEACHERS = {
    "reference": "reference: GSM8K train reference solutions over the OpenAI API (orchestrator/reference_teacher/)",
    "base": "embedded: the trainer's base model (adapters off)",
    "student": "the student itself, shown the gold solution (STaR-style)",
}


# --- lm-evaluation-harness gsm8k extraction ------------------------------------------------------------------
LM_EVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_LM_EVAL_IGNORE = [re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$")]


def lm_eval_extract(text: str, kind: str) -> str:
    """What lm-eval's gsm8k filters take from a response: strict-match the first `#### N`, flexible-extract the
    last number-like run; "[invalid]" when nothing matches (lm-eval's fallback)."""
    pattern, select = (LM_EVAL_STRICT, 0) if kind == "strict" else (LM_EVAL_FLEXIBLE, -1)
    found = pattern.findall(text or "")
    if not found:
        return "[invalid]"
    match = found[select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def lm_eval_normalise(text: str) -> str:
    for pattern in _LM_EVAL_IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def lm_eval_correct(text: str, gold: str, kind: str) -> bool:
    """lm-eval's exact_match (ignore_case, regexes_to_ignore , $ `.*#### ` `\\.$`) of the extraction."""
    return lm_eval_normalise(lm_eval_extract(text, kind)) == lm_eval_normalise(gold)


def judged(rows: list[dict]) -> list[dict]:
    """Eval rows with the lm-eval verdicts added (from the answer text each row keeps)."""
    for r in rows:
        r["lm_eval_strict_correct"] = lm_eval_correct(r.get("output") or "", r["gold"], "strict")
        r["lm_eval_flexible_correct"] = lm_eval_correct(r.get("output") or "", r["gold"], "flexible")
    return rows


JUDGEMENTS = ("strict", "flexible", "lm_eval_strict", "lm_eval_flexible")


# --- requests of the arms ------------------------------------------------------------------------------------
def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _set(d: dict, key: str, value) -> None:
    if value is not None:
        d[key] = value


SEARCH_FLAGS = (
    "shape",
    "root_samples",
    "iterations",
    "parallel_simulations",
    "n_student",
    "n_teacher_right",
    "n_teacher_wrong",
    "teacher_gold",
    "max_tokens",
    "temperature",
    "use_checker",
    "teacher_reference",
    "seed",
    "max_depth",
    "chunk_tokens",
)


def train_problems(args) -> tuple[int, int]:
    """(offset, count) of the train problems every arm trains on: with --dev, never the dev problems."""
    end = GSM8K_TRAIN_SIZE - (args.dev_examples if args.dev else 0)
    offset = min(args.train_offset, end - 1)
    return offset, max(1, min(args.train_examples, end - offset))


def product_request(args) -> dict:
    """The mcts arm's POST /train body: the run's shape, plus only the overrides given as flags."""
    search, loss, rewards = {}, {}, {}
    for key in SEARCH_FLAGS:
        _set(search, key, getattr(args, key))
    if args.rollout_max_tokens is not None:
        search["rollout"] = args.rollout_max_tokens > 0
        search["rollout_max_tokens"] = max(1, args.rollout_max_tokens)
    _set(rewards, "pre", args.pre_weight)
    _set(rewards, "hre", args.hre_weight)
    if rewards:
        search["rewards"] = rewards
    _set(loss, "type", args.loss_type)
    _set(loss, "beta", args.beta)
    _set(loss, "learning_rate", args.learning_rate)
    _set(loss, "micro_batch_size", args.micro_batch)
    _set(loss, "clip_eps_high", args.clip_eps_high)
    _set(loss, "updates", args.updates)
    offset, count = train_problems(args)
    request = {
        "split": "train",
        "offset": offset,
        "num_examples": count,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "checkpoint_every": args.checkpoint_every,
    }
    if args.curve_every and not args.dev:  # the job's quick eval reads test problems
        request.update(
            eval_every=args.curve_every,
            eval_examples=args.curve_examples,
            eval_max_tokens=args.eval_max_tokens,
            eval_concurrency=min(args.eval_concurrency, 256),
        )
    _set(request, "max_generated_tokens", args.token_budget)
    if search:
        request["search"] = search
    if loss:
        request["loss"] = loss
    _set(request, "advantage_mode", args.advantage_mode)
    _set(request, "scale_advantages", args.scale_advantages)
    _set(request, "teacher_weight", args.teacher_weight)
    _set(request, "trees_in_flight", args.trees_in_flight)
    return request


def arm_requests(args) -> dict[str, dict]:
    """Every known arm's request, the extra --arm ones included."""
    product = product_request(args)
    arms = {
        "mcts": product,
        "mcts_tree": deep_merge(product, {"advantage_mode": "tree"}),
        "grpo": deep_merge(
            product,
            {
                "search": {
                    "shape": "fork",
                    "root_samples": args.group,
                    "iterations": 0,
                    "n_teacher_right": 0,
                    "n_teacher_wrong": 0,
                    "teacher_gold": False,
                }
            },
        ),
        "sft_gold": deep_merge(
            product,
            {
                "search": {
                    "shape": "fork",
                    "root_samples": 0,
                    "iterations": 0,
                    "teacher_gold": True,
                    "teacher_temperature": 0.0,
                },
                "advantage_mode": "rejection",
                "teacher_weight": 1.0,
            },
        ),
        "legacy": deep_merge(product, {"loss": {"type": "legacy"}}),
        "mcts_group": deep_merge(product, {"teacher_paths": "group"}),
    }
    for spec in args.arm or []:
        name, _, body = spec.partition("=")
        arms[name] = deep_merge(product, json.loads(body))
    return arms


# --- services --------------------------------------------------------------------------------------------------
class Services:
    """The trainer, the reference teacher (when it is the teacher) and the orchestrator, on free ports."""

    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        self.processes = []
        self.env = {
            "REQUEST_TIMEOUT_S": str(args.request_timeout),
            "ENDPOINT_MAX_CONCURRENCY": str(args.max_requests_in_flight),
            "MAX_REQUESTS_IN_FLIGHT": str(args.max_requests_in_flight),
            "MAX_TREES_IN_FLIGHT": str(args.trees_in_flight or args.batch_size),
            "MAX_CONCURRENT_JOBS": str(max(1, args.eval_chunks)),
            # The trainer must take what the orchestrator keeps in flight (plus the evals beside it).
            "TRAINER_MAX_REQUESTS_IN_FLIGHT": str(
                max(256, 2 * args.max_requests_in_flight, 300 * args.eval_chunks)
            ),
        }

    def __enter__(self) -> Self:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> Services:
        args, workdir = self.args, self.workdir
        trainer = trainer_process(free_port(), workdir, env=self.env, cwd=REPO_ROOT)
        self.processes.append(trainer)
        trainer.start()
        trainer.wait_ready(timeout_s=900, ok=lambda body: body.get("status") == "ok")
        self.trainer_url = trainer.url
        teacher_env = {"TEACHER_TIER": "embedded"}
        endpoint = {"max_concurrency": args.max_requests_in_flight, "timeout_s": args.request_timeout}
        if args.teacher == "reference":
            reference = reference_teacher_for_student(free_port(), workdir, cwd=REPO_ROOT)
            self.processes.append(reference)
            reference.start()
            reference.wait_ready(timeout_s=120)
            teachers = [
                {"name": "reference", "base_url": reference.url + "/v1", "model": "reference", **endpoint}
            ]
            teacher_env = {"TEACHER_TIER": "custom", "TEACHERS": json.dumps(teachers)}
        elif args.teacher == "student":
            teachers = [
                {
                    "name": "student-with-reference",
                    "base_url": trainer.url + "/v1",
                    "model": "student",
                    **endpoint,
                }
            ]
            teacher_env = {"TEACHER_TIER": "custom", "TEACHERS": json.dumps(teachers)}
        orch = orchestrator_process(
            free_port(), trainer.url, workdir, env={**self.env, **teacher_env}, cwd=REPO_ROOT
        )
        self.processes.append(orch)
        orch.start()
        orch.wait_ready(timeout_s=120)
        self.url = orch.url
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            process.stop()


# --- the run ---------------------------------------------------------------------------------------------------
class PieceOver(Exception):
    """This call's --piece-s is spent; the state is saved and the next call goes on."""


class Run:
    def __init__(
        self, args, state: dict, state_path: Path, client: OrchestratorClient, trainer_url: str, log, deadline
    ):
        self.args, self.state, self.state_path = args, state, state_path
        self.client, self.trainer_url, self.log = client, trainer_url, log
        self.deadline = deadline  # time.monotonic() at which this piece ends; None: no limit

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state))

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def check_time(self, margin_s: float = 0.0) -> None:
        if self.time_left() <= margin_s:
            raise PieceOver()

    def trainer(self, path: str, body: dict) -> dict:
        response = httpx.post(f"{self.trainer_url}{path}", json=body, timeout=300)
        response.raise_for_status()
        return response.json()

    # --- judging ---------------------------------------------------------------------------------------------
    def chunks(self) -> list[tuple[int, int]]:
        _, first, n = held_out(self.args)
        size = -(-n // max(1, self.args.eval_chunks))
        return [(o, min(size, first + n - o)) for o in range(first, first + n, size)]

    def judge(self, model: str, done: dict) -> list[dict]:
        """Rows of `model` on every eval problem; chunks already in `done` (offset -> rows) are kept, the others
        run as eval jobs at once; a chunk finished is saved at once."""
        todo = [(o, n) for o, n in self.chunks() if str(o) not in done]
        jobs = {}
        for offset, n in todo:
            jobs[offset] = self.client.eval(
                split=held_out(self.args)[0],
                offset=offset,
                num_examples=n,
                models=[model],
                max_tokens=self.args.eval_max_tokens,
                concurrency=min(self.args.eval_concurrency, 256),
            )
        started = time.perf_counter()
        try:
            while jobs:
                for offset, job_id in list(jobs.items()):
                    job = self.client.job(job_id)
                    if job["status"] in ("queued", "running"):
                        continue
                    if job["status"] != "completed":
                        raise RuntimeError(f"eval of {model} at {offset}: {job['status']} {job.get('error')}")
                    done[str(offset)] = judged(self.client.results(job_id))
                    del jobs[offset]
                    self.save()
                if jobs:
                    self.check_time()
                    time.sleep(1.0)
        except PieceOver:
            for job_id in jobs.values():
                self.client.cancel(job_id)
            raise
        rows = [r for o, _ in self.chunks() for r in done[str(o)]]
        self.log(
            f"judged {model} on {len(rows)}: "
            + ", ".join(f"{k} {accuracy([r[f'{k}_correct'] for r in rows]):.1%}" for k in JUDGEMENTS)
            + (f" ({time.perf_counter() - started:.0f}s)" if todo else " (kept)")
        )
        return rows

    # --- one arm -----------------------------------------------------------------------------------------------
    def train(self, name: str, arm: dict) -> None:
        """Run (or resume) the arm's train job until it stops by itself (its max_generated_tokens, or its
        problems run out) or the piece runs out."""
        client = self.client
        if arm.get("job_id") is None:
            self.trainer("/checkpoints/load", {"name": INIT_CHECKPOINT})
            arm["job_id"] = client.train(**arm["request"])
            arm["train_started"] = time.time()
            self.save()
            self.log(f"arm {name}: POST /train -> {arm['job_id']}")
        job_id = arm["job_id"]
        job = client.job(job_id)
        if job["status"] in ("interrupted", "cancelled", "failed"):
            self.log(f"arm {name}: resuming {job_id} ({job['status']}) from its last checkpoint")
            client.resume(job_id)
        reported = 0
        while True:
            job = client.job(job_id)
            steps = [s.get("metrics", s) for s in client.steps(job_id)]
            for m in steps[reported:]:
                self.log(
                    f"arm {name} step {m.get('step')}: {m.get('generated_tokens')} tokens "
                    f"(student {m.get('student_tokens')}, teacher {m.get('teacher_tokens')}; total "
                    f"{m.get('generated_tokens_total')}), correct leaves {m.get('correct_leaf_share')} "
                    f"(the student's own {m.get('student_correct_share')}), rescued groups "
                    f"{m.get('rescued_groups')}, dropped groups {m.get('dropped_groups')}, items {m.get('items')}, "
                    f"grad norm {m.get('grad_norm')} over {m.get('updates')} updates, "
                    f"search {m.get('search_seconds')} s, "
                    f"update {m.get('grpo_seconds')} s, step {m.get('step_seconds')} s"
                )
            reported = len(steps)
            if job["status"] not in ("queued", "running"):
                break
            if self.time_left() <= self.args.piece_margin_s:
                client.cancel(job_id)
                client.wait(job_id, timeout_s=300, poll_s=0.5)
                self.log(f"arm {name}: piece over at {len(steps)} steps; the next piece resumes")
                raise PieceOver()
            time.sleep(1.0)
        if job["status"] != "completed":
            raise RuntimeError(f"train job of arm {name}: {job['status']} {job.get('error')}")
        result = job["result"]
        health = httpx.get(f"{self.trainer_url}/health", timeout=30).json()
        self.trainer("/checkpoints", {"name": f"learning-{name}-final"})
        arm.update(
            status="trained",
            steps=steps,
            generated_tokens=result["generated_tokens"],
            student_tokens=result["student_tokens"],
            teacher_tokens=result["teacher_tokens"],
            budget_reached=result["stop_reason"] == "max_generated_tokens",
            applied_steps=result["applied_steps"],
            adapter_version=health.get("adapter_version"),
            train_seconds=round(sum(float(m.get("step_seconds") or 0) for m in steps), 1),
        )
        self.save()

    def run_arm(self, name: str, request: dict, base_rows: list[dict]) -> dict:
        arms = self.state["arms"]
        arm = arms.get(name)
        if arm is None or arm["request"] != request:
            arm = arms[name] = {"request": request, "status": "training", "job_id": None, "eval": {}}
            self.save()
        if arm["status"] == "done":
            self.log(f"arm {name}: done before, kept")
            return arm["result"]
        if arm["status"] == "training":
            self.train(name, arm)
        self.trainer("/checkpoints/load", {"name": f"learning-{name}-final"})
        rows = self.judge("student", arm["eval"])
        arm["result"] = arm_result(name, arm, rows, base_rows, self.args)
        arm["status"] = "done"
        arm["eval"] = {}  # the rows live in the result
        self.save()
        r = arm["result"]
        self.log(
            f"arm {name}: strict {r['acc']:.1%} (p={r['p_value']:.3g}) flexible {r['acc_flexible']:.1%} "
            f"(p={r['p_value_flexible']:.3g}); {r['applied_steps']} steps, {r['generated_tokens']} tokens"
        )
        return r


def paired(base_rows: list[dict], rows: list[dict], kind: str) -> dict:
    base = {r["problem_id"]: r for r in base_rows}
    ids = [r["problem_id"] for r in rows if r["problem_id"] in base]
    by_id = {r["problem_id"]: r for r in rows}
    return compare_paired(
        [base[i][f"{kind}_correct"] for i in ids], [by_id[i][f"{kind}_correct"] for i in ids]
    )


def curve(steps: list[dict], base_rows: list[dict], rows: list[dict], curve_examples: int) -> list[dict]:
    """Accuracy on the first `curve_examples` judged problems against the generated tokens: the base at 0, every
    quick eval of the job (the first test problems) after the steps before it, the arm's final judgement at its
    total."""
    subset = {r["problem_id"] for r in base_rows[:curve_examples]}

    def point(tokens: int, rows_: list[dict], step) -> dict | None:
        on = [r for r in rows_ if r["problem_id"] in subset]
        if len(on) < min(curve_examples, len(base_rows)):
            return None
        return {
            "tokens": tokens,
            "step": step,
            "strict": accuracy([r["strict_correct"] for r in on]),
            "flexible": accuracy([r["flexible_correct"] for r in on]),
        }

    points = [p for p in [point(0, base_rows, 0)] if p]
    tokens = 0
    for m in steps:
        tokens += int(m.get("generated_tokens", m.get("search_tokens")) or 0)
        if m.get("eval_strict_acc") is not None:
            points.append(
                {
                    "tokens": tokens,
                    "step": m.get("step"),
                    "strict": m["eval_strict_acc"],
                    "flexible": m["eval_flexible_acc"],
                }
            )
    final = point(tokens, rows, "final")
    return points + ([final] if final else [])


def arm_result(name: str, arm: dict, rows: list[dict], base_rows: list[dict], args) -> dict:
    p = {k: paired(base_rows, rows, k) for k in JUDGEMENTS}
    return {
        "name": name,
        "n": p["strict"]["n"],
        "acc": p["strict"]["second_acc"],
        "acc_flexible": p["flexible"]["second_acc"],
        "acc_lm_eval_strict": p["lm_eval_strict"]["second_acc"],
        "acc_lm_eval_flexible": p["lm_eval_flexible"]["second_acc"],
        "p_value": p["strict"]["p_value"],
        "p_value_flexible": p["flexible"]["p_value"],
        "p_value_lm_eval_strict": p["lm_eval_strict"]["p_value"],
        "p_value_lm_eval_flexible": p["lm_eval_flexible"]["p_value"],
        "discordant": {k: [p[k]["only_first"], p[k]["only_second"]] for k in JUDGEMENTS},
        "generated_tokens": arm["generated_tokens"],
        "student_tokens": arm.get("student_tokens"),
        "teacher_tokens": arm.get("teacher_tokens"),
        "budget_reached": arm["budget_reached"],
        "applied_steps": arm["applied_steps"],
        # optimizer steps: loss.updates per applied step (records from before loss.updates made one)
        "optimizer_steps": sum(int(m.get("updates", 0 if m.get("skipped") else 1)) for m in arm["steps"]),
        "adapter_version": arm["adapter_version"],
        "train_seconds": arm["train_seconds"],
        "correct_leaf_share": [m.get("correct_leaf_share") for m in arm["steps"]],
        "student_correct_share": [m.get("student_correct_share") for m in arm["steps"]],
        "rescued_groups": [m.get("rescued_groups") for m in arm["steps"]],
        "items": [m.get("items") for m in arm["steps"]],
        "grad_norm": [m.get("grad_norm") for m in arm["steps"]],
        "mean_reward": [m.get("mean_reward") for m in arm["steps"]],
        "search_seconds": [m.get("search_seconds") for m in arm["steps"]],
        "grpo_seconds": [m.get("grpo_seconds") for m in arm["steps"]],
        "curve": curve(arm["steps"], base_rows, rows, args.curve_examples),
        "dropped_groups": [m.get("dropped_groups") for m in arm["steps"]],
        "request": arm["request"],
        "job_id": arm["job_id"],
        "rows": [{k: r[k] for k in ("problem_id", *(f"{j}_correct" for j in JUDGEMENTS))} for r in rows],
    }


# --- outputs ---------------------------------------------------------------------------------------------------
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


def figures(state: dict, args, command: str) -> dict:
    """The machine-readable result: base vs --head (else the mcts arm, else the first arm), ablations beside."""
    base = state["base_rows"]
    arms = [state["arms"][a]["result"] for a in state["arm_order"] if state["arms"].get(a, {}).get("result")]
    head = next((a for a in arms if a["name"] == (args.head or "mcts")), arms[0] if arms else None)
    pieces = state["pieces"]
    gpu = gpu_name()
    base_acc = {k: accuracy([r[f"{k}_correct"] for r in base]) for k in JUDGEMENTS}
    keep = (
        "name",
        "acc",
        "acc_flexible",
        "acc_lm_eval_strict",
        "acc_lm_eval_flexible",
        "p_value",
        "p_value_flexible",
        "p_value_lm_eval_strict",
        "p_value_lm_eval_flexible",
        "discordant",
        "generated_tokens",
        "student_tokens",
        "teacher_tokens",
        "budget_reached",
        "applied_steps",
        "train_seconds",
    )
    split, offset, _ = held_out(args)
    return {
        "n": len(base),
        "eval_split": split if not args.dev else f"train (dev: the last {args.dev_examples} train problems)",
        "eval_offset": offset,
        "dev": args.dev,
        "base_acc": base_acc["strict"],
        "base_acc_flexible": base_acc["flexible"],
        "base_acc_lm_eval_strict": base_acc["lm_eval_strict"],
        "base_acc_lm_eval_flexible": base_acc["lm_eval_flexible"],
        "arm": head["name"] if head else None,
        "trained_acc": head["acc"] if head else None,
        "trained_acc_flexible": head["acc_flexible"] if head else None,
        "p_value": head["p_value"] if head else None,
        "p_value_flexible": head["p_value_flexible"] if head else None,
        "generated_tokens": head["generated_tokens"] if head else None,
        "token_budget": args.token_budget,
        "teacher": TEACHERS[args.teacher],
        "pieces": len(pieces),
        "wall_minutes": round(sum(p["wall_s"] for p in pieces) / 60, 2),
        "gpu_minutes": round(sum(p["wall_s"] for p in pieces) / 60, 2) if gpu else 0.0,
        "ablations": [{k: a.get(k) for k in keep} for a in arms],
        "machine": describe_machine() + (f", GPU {gpu}" if gpu else ", no GPU"),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "commands": [p["command"] for p in pieces],
        "curves": {a["name"]: a["curve"] for a in arms},
        "requests": {a["name"]: a["request"] for a in arms},
    }


def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("strict", "flexible")):
        for name, points in result["curves"].items():
            ax.plot([p["tokens"] for p in points], [100 * p[kind] for p in points], marker="o", label=name)
        held = "dev" if result.get("dev") else "test"
        ax.set_title(f"{kind} accuracy, first {result.get('curve_examples', '?')} {held} problems")
        ax.set_xlabel("generated tokens (search: student + teacher)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% correct")
    axes[0].legend(fontsize=8)
    arms = ", ".join(f"{a['name']} {100 * a['acc']:.1f}% (p={a['p_value']:.2g})" for a in result["ablations"])
    held = "GSM8K dev (train tail)" if result.get("dev") else "GSM8K test"
    fig.suptitle(
        f"{held}, all {result['n']} strict: base {100 * result['base_acc']:.1f}%, {arms}", fontsize=8
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def append_runs_log(path: Path, entry: dict) -> None:
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1) + "\n")


# --- main --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--arms", default=DEFAULT_ARMS, help=f"comma-separated arms to run, in order (default {DEFAULT_ARMS})")
    a("--arm", action="append", help="extra arm NAME=JSON, deep-merged over the mcts request")
    a("--head", default=None, help="the arm reported as trained_acc/p_value (default: mcts)")
    a("--teacher", choices=tuple(TEACHERS), default="reference", help="the teacher the services start with")
    a("--workdir", default="runs/learning", help="services' files and the resumable state")
    a("--fresh", action="store_true", help="forget the state in --workdir (base eval and every arm)")
    a(
        "--token-budget",
        type=int,
        default=None,
        help="generated tokens per arm (student + teacher): the job's max_generated_tokens",
    )
    a("--piece-s", type=float, default=None, help="end this call after so many seconds (exit 3; run again)")
    a("--piece-margin-s", type=float, default=30.0, help="time kept for a clean stop at the end of a piece")
    # held-out eval
    a("--eval-examples", type=int, default=GSM8K_TEST_SIZE, help="GSM8K test problems judged (default: all)")
    a("--eval-offset", type=int, default=0)
    a(
        "--dev",
        action="store_true",
        help="tuning mode: judge on the last --dev-examples GSM8K train problems (no arm trains on them), "
        "never on test; outputs default to learning_dev.*",
    )
    a("--dev-examples", type=int, default=500, help="size of the dev split carved from the end of train")
    a("--eval-max-tokens", type=int, default=256)
    a("--eval-concurrency", type=int, default=256, help="answers in flight per eval job (at most 256)")
    a("--eval-chunks", type=int, default=4, help="eval jobs run at once (each a slice of the problems)")
    a("--curve-every", type=int, default=None, help="quick eval every N steps for the curve (default: none)")
    a("--curve-examples", type=int, default=300, help="first N test problems in the quick eval")
    # the run's shape, the same for every arm
    a("--train-examples", type=int, default=7473)
    a("--train-offset", type=int, default=0)
    a("--epochs", type=int, default=1)
    a("--batch-size", type=int, default=64, help="problems per GRPO step")
    a("--trees-in-flight", type=int, default=None)
    a(
        "--checkpoint-every",
        type=int,
        default=1,
        help="steps between the job's checkpoints (a piece resumes there)",
    )
    a(
        "--group",
        type=int,
        default=8,
        help="answers per problem in the grpo arm (the product's group is 8 too)",
    )
    # overrides of the product's defaults (every arm; not sent when left out)
    a("--learning-rate", type=float, default=None)
    a("--beta", type=float, default=None, help="KL coefficient")
    a("--loss-type", choices=("grpo", "dr_grpo", "legacy"), default=None)
    a("--clip-eps-high", type=float, default=None)
    a("--micro-batch", type=int, default=None)
    a(
        "--updates",
        type=int,
        default=None,
        help="optimizer steps per GRPO step over its items (loss.updates; the product's default is 1)",
    )
    a("--teacher-weight", type=float, default=None)
    a("--advantage-mode", choices=("flat", "tree", "rejection"), default=None)
    a("--scale-advantages", action=argparse.BooleanOptionalAction, default=None, help="GRPO's std scaling")
    a("--pre-weight", type=float, default=None)
    a("--hre-weight", type=float, default=None)
    a(
        "--shape",
        choices=("fork", "line"),
        default=None,
        help="the search shape (default: the product's, fork)",
    )
    a("--root-samples", type=int, default=None, help="fork: whole student answers per problem in round 0")
    a("--iterations", type=int, default=None, help="fork: forks per tree; line: MCTS simulations")
    a("--parallel-simulations", type=int, default=None, help="fork: forks per round")
    a("--n-student", type=int, default=None, help="fork: student continuations per fork")
    a("--n-teacher-right", type=int, default=None)
    a("--n-teacher-wrong", type=int, default=None)
    a(
        "--teacher-gold",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fork: gold in all-wrong trees",
    )
    a("--max-tokens", type=int, default=None, help="token budget of one answer (search path)")
    a("--max-depth", type=int, default=None, help="line search only")
    a("--chunk-tokens", type=int, default=None, help="line search only")
    a("--rollout-max-tokens", type=int, default=None, help="line search only; 0: no rollouts")
    a("--use-checker", action=argparse.BooleanOptionalAction, default=None)
    a(
        "--teacher-reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a model teacher is shown the gold solution (search.teacher_reference)",
    )
    a("--temperature", type=float, default=None)
    a("--seed", type=int, default=None)
    # services and outputs
    a("--request-timeout", type=float, default=900.0)
    a("--max-requests-in-flight", type=int, default=256)
    a("--json-out", default=None, help="default: bench/results/learning.json (learning_dev.json with --dev)")
    a("--png-out", default=None, help="default: bench/results/learning.png (learning_dev.png with --dev)")
    a("--runs-log", default="bench/results/learning_runs.json", help="every finished arm, appended")
    a("--tag", default="", help="a label stored with every arm in --runs-log")
    args = p.parse_args(argv)
    if args.eval_offset + args.eval_examples > GSM8K_TEST_SIZE:
        p.error(f"--eval-offset + --eval-examples exceeds the {GSM8K_TEST_SIZE} test problems")
    if args.dev and not 1 <= args.dev_examples <= GSM8K_TEST_SIZE:
        p.error(f"--dev-examples must be 1..{GSM8K_TEST_SIZE} (an eval job's limit)")
    suffix = "_dev" if args.dev else ""
    args.json_out = args.json_out or f"bench/results/learning{suffix}.json"
    args.png_out = args.png_out or f"bench/results/learning{suffix}.png"
    if args.dev and not args.tag:
        args.tag = "dev"
    return args


def held_out(args) -> tuple[str, int, int]:
    """(split, offset, n) of the problems base and arms are judged on: the test problems, or with --dev the
    last --dev-examples train problems (train_problems() keeps every arm off them)."""
    if args.dev:
        return "train", GSM8K_TRAIN_SIZE - args.dev_examples, args.dev_examples
    return "test", args.eval_offset, args.eval_examples


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = time.monotonic() + args.piece_s if args.piece_s else None  # the piece counts from here
    command = "python bench/learning.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / "learning_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() and not args.fresh else {}
    split, first, n = held_out(args)
    key = {
        "eval_split": split,
        "eval_examples": n,
        "eval_offset": first,
        "eval_max_tokens": args.eval_max_tokens,
        "token_budget": args.token_budget,
        "teacher": args.teacher,
    }
    if state.get("key") != key:
        state = {
            "key": key,
            "base_eval": {},
            "base_rows": None,
            "arms": {},
            "arm_order": [],
            "pieces": [],
            "init_saved": False,
        }

    def log(message: str) -> None:
        print(f"[learning {time.perf_counter() - started:6.0f}s] {message}", flush=True)

    requests = arm_requests(args)
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in requests]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {sorted(requests)}")
    if "sft_gold" in wanted and args.teacher != "reference":
        raise SystemExit(
            "the sft_gold arm writes the reference solutions through the reference teacher: --teacher reference"
        )

    state["pieces"].append({"command": command, "wall_s": 0.0, "date": datetime.now(UTC).isoformat()})
    finished = False
    try:
        with Services(args, workdir) as services:
            log(
                f"services ready: orchestrator {services.url}, trainer {services.trainer_url}, teacher {args.teacher}"
            )
            with OrchestratorClient(services.url, timeout_s=120) as client:
                run = Run(args, state, state_path, client, services.trainer_url, log, deadline)
                if not state["init_saved"]:
                    run.trainer("/checkpoints", {"name": INIT_CHECKPOINT})
                    state["init_saved"] = True
                    run.save()
                if state["base_rows"] is None:
                    state["base_rows"] = run.judge("base", state["base_eval"])
                    state["base_eval"] = {}
                    run.save()
                for name in wanted:
                    result = run.run_arm(name, requests[name], state["base_rows"])
                    if name not in state["arm_order"]:
                        state["arm_order"].append(name)
                        run.save()
                        append_runs_log(
                            Path(args.runs_log),
                            {
                                "tag": args.tag,
                                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                "command": command,
                                "machine_gpu": gpu_name(),
                                **{k: v for k, v in result.items() if k not in ("curve", "rows")},
                            },
                        )
                finished = True
    except PieceOver:
        log("piece over: state saved; run the same command again to go on")
    finally:
        state["pieces"][-1]["wall_s"] = round(time.perf_counter() - started, 1)
        state_path.write_text(json.dumps(state))
    if not finished:
        return PIECE_EXIT

    result = figures(state, args, command)
    result["curve_examples"] = args.curve_examples
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    plot_curves(result, Path(args.png_out))
    log(
        f"base strict {result['base_acc']:.1%} flexible {result['base_acc_flexible']:.1%} (n={result['n']}), "
        f"{result['pieces']} pieces, {result['wall_minutes']} min"
    )
    for a in result["ablations"]:
        log(
            f"  {a['name']:<10} strict {a['acc']:.1%} p={a['p_value']:.3g}   flexible {a['acc_flexible']:.1%} "
            f"p={a['p_value_flexible']:.3g}   {a['generated_tokens']} tokens, {a['applied_steps']} steps"
        )
    log(f"wrote {args.json_out}, {args.png_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
