"""The throughput gap: generated tokens/s of plain sampling against the product's search, on ONE trainer service.

    python bench/search_throughput.py --problems 8 --group 8 --max-tokens 128 --out bench/results/search_throughput.json

On the same GSM8K train problems, in one process, against one trainer service (started here on a free port of
127.0.0.1, or --trainer-url) and one reference teacher (orchestrator/reference_teacher/), every tree in flight:

- sample:            the grpo arm's request shape: per problem one request of `group` whole student answers
                     (the fork search's round 0 alone: no forks, no teachers, no gold answer);
- search_fork:       the product's search as a train step runs it (the SearchConfig defaults: the fork search,
                     4 answers + 2 forks x 2 continuations = 8 student rows per problem, a "right" teacher
                     continuation at each fork, the gold answer for all-wrong trees, no checker), with the
                     reference teacher and the same answer budget as `sample` (--max-tokens);
- search_line_embedded, search_line_reference, search_line_reference_nochecker: the line search
  (settings.LINE_SEARCH, the default before issue #19) with the embedded teacher and checker (the trainer's
  "base" model), with the reference teacher, and with the reference teacher and no checker (phase 1's figures).

Every request goes through an LLMPool and a TrainerClient that record it (who asked, n, max_tokens, latency,
tokens), and the trainer's /health batcher counters are read before and after each phase. Per phase it reports:
generated tokens/s (all, and the student's alone), requests and round trips per tree, tokens per request by
kind, the trainer's forward passes and generated tokens per forward pass (a proxy for rows per decode pass:
prefill and scoring passes are counted too), time spent waiting on /logprobs, the checker and the teachers
(summed latencies, and their share of the summed latency of all requests), the mean number of requests in
flight, and the depth-sequential latency (each tree's critical path: the summed latency of the requests that
had to wait for each other). Line-search sizes can be cut for a CPU (--search-max-tokens, --rollout-max-tokens,
--iterations); the JSON records what ran. Phases run one after another, not interleaved: on a shared machine
say what else ran (the JSON records the load average before and after each phase).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx

from orchestrator.clients.llm import LLMError, LLMPool, RetryPolicy
from orchestrator.clients.trainer import TrainerClient
from orchestrator.gsm8k.data import load_gsm8k
from orchestrator.local.machine import describe_machine
from orchestrator.local.processes import (
    free_port,
    reference_teacher_for_student,
    trainer_process,
)
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_searches
from orchestrator.search.teachers import TeacherEnsemble
from orchestrator.search.terminal import TerminalChecker
from orchestrator.settings import LINE_SEARCH, EndpointSpec, SearchConfig, Settings

PHASES = (
    "sample",
    "search_fork",
    "search_line_embedded",
    "search_line_reference",
    "search_line_reference_nochecker",
)
DEFAULT_PHASES = "sample,search_fork"


# --- recording clients -----------------------------------------------------------------------------------------
class RecordingPool(LLMPool):
    """An LLMPool that keeps one record per chat request: who was asked, the shape, latency and tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    async def chat(self, endpoint: EndpointSpec, messages: list[dict], retry=None, **params):
        started = time.perf_counter()
        try:
            completion = await super().chat(endpoint, messages, retry=retry, **params)
        except LLMError:
            self.records.append(
                {"who": endpoint.name, "error": True, "latency": time.perf_counter() - started}
            )
            raise
        self.records.append(
            {
                "who": endpoint.name,
                "model": endpoint.model,
                "base_url": endpoint.base_url.rstrip("/"),
                "n": params.get("n", 1),
                "max_tokens": params.get("max_tokens"),
                "whole": params.get("stop") is None,
                "latency": completion.latency_s,
                "completion_tokens": int(completion.usage.get("completion_tokens", 0) or 0),
                "prompt_tokens": int(completion.usage.get("prompt_tokens", 0) or 0),
            }
        )
        return completion


class RecordingTrainer(TrainerClient):
    """A TrainerClient that keeps one record per POST /logprobs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    async def logprobs(self, items, model="student"):
        started = time.perf_counter()
        out = await super().logprobs(items, model)
        self.records.append(
            {
                "who": "logprobs",
                "items": len(items),
                "latency": time.perf_counter() - started,
                "tokens": sum(r.num_tokens for r in out.results),
            }
        )
        return out


# --- one phase ---------------------------------------------------------------------------------------------------
def search_config(args, phase: str) -> SearchConfig:
    settings = (
        Settings()
    )  # the product's defaults (MAX_TREE_DEPTH, NUM_MCTS_ITERATIONS, MAX_TOKENS, CHUNK_TOKENS)
    if phase == "sample":
        return SearchConfig.from_settings(
            settings,
            shape="fork",
            root_samples=args.group,
            iterations=0,
            n_teacher_right=0,
            n_teacher_wrong=0,
            teacher_gold=False,
            max_tokens=args.max_tokens,
        )
    if phase == "search_fork":
        return SearchConfig.from_settings(settings, max_tokens=args.max_tokens)
    overrides = dict(LINE_SEARCH)
    if args.search_max_tokens:
        overrides["max_tokens"] = args.search_max_tokens
    if args.rollout_max_tokens:
        overrides["rollout_max_tokens"] = args.rollout_max_tokens
    if args.iterations:
        overrides["iterations"] = args.iterations
    if phase == "search_line_reference_nochecker":
        overrides["use_checker"] = False
    return SearchConfig.from_settings(settings, **overrides)


def summarise(
    phase: str,
    config: SearchConfig,
    results,
    pool: RecordingPool,
    trainer: RecordingTrainer,
    before: dict,
    after: dict,
    wall: float,
    teacher_names: list[str],
    trainer_v1: str,
) -> dict:
    chats = [r for r in pool.records if not r.get("error")]
    scores = trainer.records
    trees = len(results)

    def kind(r: dict) -> str:
        if r["who"] == "student":
            return (
                "student_answer" if r["whole"] else "student_step"
            )  # whole answers, continuations, rollouts
        if r["who"] == "checker":
            return "checker"
        return "teacher" if r["who"] in teacher_names else r["who"]

    by_kind: dict[str, dict] = {}
    for r in chats:
        k = by_kind.setdefault(kind(r), {"requests": 0, "rows": 0, "completion_tokens": 0, "latency_s": 0.0})
        k["requests"] += 1
        k["rows"] += r["n"]
        k["completion_tokens"] += r["completion_tokens"]
        k["latency_s"] += r["latency"]
    if scores:
        by_kind["logprobs"] = {
            "requests": len(scores),
            "rows": sum(r["items"] for r in scores),
            "completion_tokens": 0,
            "scored_tokens": sum(r["tokens"] for r in scores),
            "latency_s": sum(r["latency"] for r in scores),
        }
    total_latency = sum(k["latency_s"] for k in by_kind.values()) or 1e-9
    for k in by_kind.values():
        k["tokens_per_request"] = round(k["completion_tokens"] / k["requests"], 1) if k["requests"] else 0
        k["mean_latency_s"] = round(k["latency_s"] / k["requests"], 3) if k["requests"] else 0
        k["latency_share"] = round(k["latency_s"] / total_latency, 3)
        k["latency_s"] = round(k["latency_s"], 2)
    generated = sum(r["completion_tokens"] for r in chats)
    student_tokens = sum(r["completion_tokens"] for r in chats if r["who"] == "student")
    # what the trainer decoded: the student's rows, and the "base" rows of an embedded teacher or checker
    trainer_tokens = sum(r["completion_tokens"] for r in chats if r["base_url"] == trainer_v1)
    counters_before, counters_after = before.get("batcher", {}), after.get("batcher", {})
    delta = {
        k: counters_after.get(k, 0) - counters_before.get(k, 0)
        for k in counters_after
        if k != "max_batch_rows"
    }
    stats = [r.stats for r in results]
    return {
        "phase": phase,
        "trees": trees,
        "wall_s": round(wall, 2),
        "generated_tokens": generated,
        "student_tokens": student_tokens,
        "teacher_tokens": sum(r["completion_tokens"] for r in chats if kind(r) == "teacher"),
        "tokens_per_s": round(generated / wall, 1),
        "student_tokens_per_s": round(student_tokens / wall, 1),
        "requests_per_tree": round((len(chats) + len(scores)) / trees, 1),
        "chat_requests_per_tree": round(len(chats) / trees, 1),
        "request_errors": sum(1 for r in pool.records if r.get("error")),
        "by_kind": by_kind,
        "mean_requests_in_flight": round(total_latency / wall, 2),
        "trainer": {
            "forward_passes": delta.get("forward_passes"),
            "forward_batches": delta.get("forward_batches"),
            "merged_requests": delta.get("merged_requests"),
            "admitted_requests": delta.get("admitted_requests"),
            "generated_tokens_per_forward_pass": round(trainer_tokens / delta["forward_passes"], 2)
            if delta.get("forward_passes")
            else None,
            "max_batch_rows_ever": counters_after.get("max_batch_rows"),
        },
        "tree_seconds_mean": round(statistics.mean(s["seconds"] for s in stats), 2),
        "critical_path_s_mean": round(statistics.mean(s["critical_path_s"] for s in stats), 2),
        "expansions_per_tree": round(statistics.mean(s["expansions"] for s in stats), 1),
        "simulations_per_tree": round(statistics.mean(s["simulations"] for s in stats), 1),
        "rollouts_per_tree": round(statistics.mean(s["rollouts"] for s in stats), 1),
        "checker_calls_per_tree": round(statistics.mean(s["checker_calls"] for s in stats), 1),
        "max_depth_reached_mean": round(statistics.mean(s["max_depth_reached"] for s in stats), 1),
        "terminal_leaves_per_tree": round(statistics.mean(s["terminal_leaves"] for s in stats), 1),
        "correct_leaves_per_tree": round(statistics.mean(s["correct_leaves"] for s in stats), 2),
        "answers_per_tree": round(statistics.mean(s.get("answers", 0) for s in stats), 1),
        "forks_per_tree": round(statistics.mean(s.get("forks", 0) for s in stats), 1),
        "gold_added_trees": sum(bool(s.get("gold_added")) for s in stats),
        "degraded": sorted({d for s in stats for d in s["degraded"]}),
        "config": config.model_dump(),
    }


async def run_phase(phase: str, args, problems, trainer_url: str, reference_url: str | None) -> dict:
    settings = Settings(trainer_url=trainer_url, request_timeout_s=args.request_timeout)
    endpoint_kw = {"max_concurrency": args.max_requests_in_flight, "timeout_s": args.request_timeout}
    if phase in ("search_fork", "search_line_reference", "search_line_reference_nochecker"):
        teachers = [
            EndpointSpec(name="reference", base_url=reference_url + "/v1", model="reference", **endpoint_kw)
        ]
    else:
        teachers = [
            EndpointSpec(name="embedded-base", base_url=settings.trainer_v1, model="base", **endpoint_kw)
        ]
    config = search_config(args, phase)
    async with RecordingPool(
        max_in_flight=args.max_requests_in_flight, retry=RetryPolicy(max_retries=1)
    ) as pool:
        trainer = RecordingTrainer(trainer_url, timeout_s=args.request_timeout)
        async with trainer:
            services = SearchServices(
                pool=pool,
                teachers=TeacherEnsemble(teachers),
                checker=TerminalChecker(pool, settings.checker_endpoint().model_copy(update=endpoint_kw)),
                student=settings.student_endpoint().model_copy(update=endpoint_kw),
                trainer=trainer,
            )
            before = (await trainer.health()).model_dump()
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            in_flight = args.trees_in_flight or len(problems)
            results = await run_searches(problems, config, services, max_trees_in_flight=in_flight)
            wall = time.perf_counter() - started
            load_after = os.getloadavg()[0]
            after = (await trainer.health()).model_dump()
    summary = summarise(
        phase,
        config,
        results,
        pool,
        trainer,
        before,
        after,
        wall,
        [t.name for t in teachers],
        settings.trainer_v1.rstrip("/"),
    )
    summary["trees_in_flight"] = in_flight
    summary["load_avg_1m"] = [round(load_before, 2), round(load_after, 2)]
    return summary


# --- main --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a(
        "--phases",
        default=DEFAULT_PHASES,
        help=f"comma-separated, in order, of {','.join(PHASES)} (default {DEFAULT_PHASES})",
    )
    a("--problems", type=int, default=4, help="GSM8K train problems (the same in every phase)")
    a("--offset", type=int, default=0)
    a("--group", type=int, default=8, help="answers per problem in the sample phase")
    a("--max-tokens", type=int, default=256, help="tokens of one answer (sample and search_fork)")
    a(
        "--trees-in-flight",
        type=int,
        default=None,
        help="trees growing at once (default: all, as a train step)",
    )
    a(
        "--search-max-tokens",
        type=int,
        default=None,
        help="line search: token budget of a path (default: LINE_SEARCH's)",
    )
    a("--rollout-max-tokens", type=int, default=None, help="line search: tokens of a rollout (default: 256)")
    a("--iterations", type=int, default=None, help="line search: simulations per tree (default: 8)")
    a("--max-requests-in-flight", type=int, default=64, help="MAX_REQUESTS_IN_FLIGHT's default")
    a("--request-timeout", type=float, default=900.0)
    a("--trainer-url", default=None, help="a running trainer service (default: start one here)")
    a("--workdir", default="runs/search_throughput")
    a("--out", default="bench/results/search_throughput.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/search_throughput.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in phases if x not in PHASES]
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; known: {PHASES}")
    workdir = Path(args.workdir).resolve()
    problems = load_gsm8k("train", None, args.problems, args.offset)
    services = []
    trainer_url = args.trainer_url
    if trainer_url is None:
        trainer = trainer_process(free_port(), workdir, cwd=REPO_ROOT)
        services.append(trainer)
        trainer_url = trainer.url
    reference_url = None
    try:
        for s in services:
            s.start()
            s.wait_ready(timeout_s=900, ok=lambda body: body.get("status") == "ok")
        if any(
            x in ("search_fork", "search_line_reference", "search_line_reference_nochecker") for x in phases
        ):
            teacher = reference_teacher_for_student(free_port(), workdir, cwd=REPO_ROOT)
            services.append(teacher)
            teacher.start()
            teacher.wait_ready(timeout_s=120)
            reference_url = teacher.url
        health = httpx.get(trainer_url + "/health", timeout=30).json()
        out = {
            "command": command,
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": describe_machine(),
            "trainer": {k: health.get(k) for k in ("backend", "device", "model")},
            "problems": [p.id for p in problems],
            "phases": {},
        }
        for phase in phases:
            result = asyncio.run(run_phase(phase, args, problems, trainer_url, reference_url))
            out["phases"][phase] = result
            print(
                f"{phase:<28} {result['wall_s']:>7.1f}s  {result['generated_tokens']:>6} tok "
                f"({result['student_tokens']} student)  {result['tokens_per_s']:>6.1f} tok/s "
                f"({result['student_tokens_per_s']:.1f} student)  {result['requests_per_tree']:.0f} requests/tree  "
                f"critical path {result['critical_path_s_mean']:.1f}s of {result['tree_seconds_mean']:.1f}s/tree  "
                f"tok/fwd {result['trainer']['generated_tokens_per_forward_pass']}",
                flush=True,
            )
            write(out, Path(args.out))  # after every phase: a run cut short keeps what it measured
    finally:
        for s in reversed(services):
            s.stop()
    print(f"wrote {args.out}")
    return 0


def write(out: dict, path: Path) -> None:
    if "sample" in out["phases"]:
        base = out["phases"]["sample"]["tokens_per_s"]
        for result in out["phases"].values():
            result["tokens_per_s_vs_sample"] = round(result["tokens_per_s"] / base, 3) if base else None
            result["student_tokens_per_s_vs_sample"] = (
                round(result["student_tokens_per_s"] / base, 3) if base else None
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
