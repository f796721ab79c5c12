"""Reliability (issue #18): faults and abuse against real processes on loopback, one phase each, figures as JSON.

    .venv/bin/python bench/reliability_bench.py                        # every phase -> bench/results/reliability.json
    .venv/bin/python bench/reliability_bench.py --phases load,streaming

Phases (each starts what it needs: the trainer with the tiny model, the orchestrator, the scripted teacher server):
- dead_teacher: a train job whose two teachers share a tier, one accepting connections and never answering (1 s
  timeout), no rest (TEACHER_COOLDOWN_S=0); each step's share of picks and weight of the dead one.
- checkpoint_disk: a trainer with TRAINER_CHECKPOINT_KEEP_LAST=3 and a byte budget; two jobs' series of
  checkpoints and a flood of named ones (as the fuzz that wrote 5.5 GB did); the folder's size after every save.
- schemathesis: both services' OpenAPI schemas with the conformance checks of tests/support/fuzz.py.
- streaming: the official openai client, sync and async, streamed against whole answers.
- load: 255 and 512 concurrent chat completions for --load-s seconds each (tests/support/load.py).
- keep_alive: the cause of the resets: storms of 255 clients of cheap requests (a 422) against trainers with
  TRAINER_KEEP_ALIVE_S = 5 (uvicorn's default), 2 (the race made frequent) and 75 (the default now).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.local.machine import describe_machine
from orchestrator.local.processes import free_port, orchestrator_process
from support.scripted_server import Rule, ScriptedServer, ServerConfig
from support.tiny_search import TINY_SEARCH
from support.trainer_process import TrainerProcess

PHASES = ("dead_teacher", "checkpoint_disk", "schemathesis", "streaming", "load", "keep_alive")
CHAT = {
    "model": "student",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 2,
    "temperature": 0,
}


def dead_teacher(args) -> dict:
    search = {**TINY_SEARCH, "iterations": 8}  # the fork search (the default shape): 8 forks x 2 teacher requests
    workdir = Path(tempfile.mkdtemp(prefix="azt-rel-teacher-"))
    with TrainerProcess(checkpoint_dir=workdir / "ckpt") as trainer, ScriptedServer() as scripted:
        scripted.set_rules([Rule(mode="hang", model="dead")])
        teachers = [
            {"name": name, "base_url": scripted.v1, "model": name, "tier": "one", **extra}
            for name, extra in (("dead", {"timeout_s": 1.0}), ("live", {}))
        ]
        env = {
            "TEACHER_TIER": "custom",
            "TEACHERS": json.dumps(teachers),
            "TEACHER_COOLDOWN_S": "0",
        }
        with orchestrator_process(free_port(), trainer.url, workdir, env=env, cwd=REPO) as process:
            process.wait_ready(60)
            client = OrchestratorClient(process.url, timeout_s=120)
            steps = args.teacher_steps
            job_id = client.train(num_examples=2 * steps, batch_size=2, checkpoint_every=steps, search=search)
            per_step = [e.data for e in client.follow(job_id) if e.type == "teachers"]
            job = client.job(job_id)
            client.close()
    dead = [s["teachers"]["dead"] for s in per_step]
    return {
        "job_status": job["status"],
        "setup": "2 teachers in one tier: 'dead' hangs (1 s timeout), 'live' answers; TEACHER_COOLDOWN_S=0; "
        f"{steps} steps of 2 problems, the fork search with 8 forks per tree",
        "dead_pick_share_per_step": [d["pick_share"] for d in dead],
        "dead_picks_per_step": [d["picks"] for d in dead],
        "dead_weight_per_step": [d["weight"] for d in dead],
        "dead_failure_rate_per_step": [d["failure_rate"] for d in dead],
        "live_picks_per_step": [s["teachers"]["live"]["picks"] for s in per_step],
    }


def checkpoint_disk(args) -> dict:
    budget = args.checkpoint_budget_mb * 10**6
    env = {"TRAINER_CHECKPOINT_KEEP_LAST": "3", "TRAINER_CHECKPOINT_MAX_BYTES": str(budget)}
    workdir = Path(tempfile.mkdtemp(prefix="azt-rel-ckpt-"))
    sizes, codes = [], Counter()
    with TrainerProcess(checkpoint_dir=workdir, env=env) as trainer:
        names = [f"train-{job}-step{step:06d}" for step in range(args.checkpoint_steps) for job in ("a", "b")]
        names += [f"named-{i}" for i in range(args.checkpoint_named)]
        for name in names:
            response = httpx.post(trainer.url + "/checkpoints", json={"name": name}, timeout=300)
            codes[response.status_code] += 1
            sizes.append(sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file()))
        listing = httpx.get(trainer.url + "/checkpoints", timeout=30).json()
    per_series = Counter(
        c["name"].rsplit("-step", 1)[0] for c in listing["checkpoints"] if "-step" in c["name"]
    )
    return {
        "budget_bytes": budget,
        "keep_last": 3,
        "saves": len(names),
        "answers": {str(k): v for k, v in codes.items()},
        "max_folder_bytes": max(sizes),
        "final_folder_bytes": sizes[-1],
        "checkpoints_left": len(listing["checkpoints"]),
        "job_checkpoints_left": dict(per_series),
        "bounded": max(sizes) <= budget and all(v <= 3 for v in per_series.values()),
    }


def schemathesis_phase(args) -> dict:
    from support.fuzz import fuzz

    token = "reliability"
    headers = {"Authorization": f"Bearer {token}"}
    out: dict = {"examples_per_operation_and_mode": args.fuzz_examples, "failures": {}, "cases": {}}
    env = {"TRAINER_API_TOKEN": token, "TRAINER_MAX_GENERATION_TOKENS": "64"}
    with TrainerProcess(env=env) as trainer:
        statuses, failures = fuzz(trainer.url, headers, args.fuzz_examples)
        out["failures"]["trainer"], out["cases"]["trainer"] = failures, _cases(statuses)
    workdir = Path(tempfile.mkdtemp(prefix="azt-rel-fuzz-"))
    with ScriptedServer(ServerConfig(answer="42", answer_depth=1)) as scripted:
        env = {"API_TOKEN": token, "MAX_TREE_NODES": "4096"}
        with orchestrator_process(free_port(), scripted.url, workdir, env=env, cwd=REPO) as process:
            process.wait_ready(60)
            statuses, failures = fuzz(process.url, headers, args.fuzz_examples)
            out["failures"]["orchestrator"], out["cases"]["orchestrator"] = failures, _cases(statuses)
    out["conformance_failures"] = sum(len(f) for f in out["failures"].values())
    return out


def _cases(statuses: dict[str, Counter]) -> dict:
    total = Counter()
    for counts in statuses.values():
        total.update(counts)
    return {"operations": len(statuses), "by_mode_and_status": dict(sorted(total.items()))}


def streaming(args) -> dict:
    import openai

    messages = [{"role": "user", "content": "What is 2 + 3? Answer briefly."}]
    checks: dict[str, bool] = {}
    with TrainerProcess() as trainer:
        client = openai.OpenAI(base_url=trainer.base_url, api_key="none", max_retries=0)
        whole = client.chat.completions.create(
            model="student", messages=messages, max_tokens=24, temperature=0
        )
        chunks = list(
            client.chat.completions.create(
                model="student",
                messages=messages,
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        checks["sync_chat_text_equals_whole"] = text == whole.choices[0].message.content
        checks["sync_chat_usage_chunk_last"] = chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)

        async def async_completions():
            aclient = openai.AsyncOpenAI(base_url=trainer.base_url, api_key="none", max_retries=0)
            request = {"model": "base", "prompt": ["1, 2, 3,", "Paris is"], "n": 2, "max_tokens": 12}
            whole = await aclient.completions.create(**request, temperature=0)
            texts: dict[int, str] = {}
            async for chunk in await aclient.completions.create(**request, temperature=0, stream=True):
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
            return texts == {c.index: c.text for c in whole.choices}

        checks["async_completions_equal_whole"] = asyncio.run(async_completions())
        before = httpx.get(trainer.url + "/health").json()["batcher"]["requests"]
        body = {"model": "base", "prompt": "1, 2, 3, 4,", "max_tokens": 64, "temperature": 0, "stream": True}
        with httpx.stream("POST", trainer.url + "/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    break
            during = httpx.get(trainer.url + "/health").json()["batcher"]["requests"]
            last = [line for line in lines if line.startswith("data: ")][-1]
        checks["first_text_before_the_job_finished"] = during == before
        checks["ends_with_done"] = last == "data: [DONE]"
    return {"ok": all(checks.values()), "checks": checks, "sync_chat_content_chunks": content_chunks}


def load(args) -> dict:
    from support.load import hold_load

    body = {**CHAT, "max_tokens": args.load_max_tokens}
    out: dict = {"request": body}
    with TrainerProcess() as trainer:
        for concurrency in (255, 512):
            report = asyncio.run(
                hold_load(trainer.url, "/v1/chat/completions", body, concurrency, args.load_s)
            )
            out[str(concurrency)] = report.as_dict()
    return out


def keep_alive(args) -> dict:
    """Resets per keep-alive setting: each storm opens 255 connections that send cheap requests back to back."""
    bad = {"model": "student", "prompt": "x", "n": 0}  # refused at validation: the HTTP layer's own rate

    async def storm(url: str) -> tuple[int, Counter]:
        deadline, done, errors = time.monotonic() + 4.0, Counter(), Counter()
        limits = httpx.Limits(max_connections=255, max_keepalive_connections=255)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

            async def one() -> None:
                while time.monotonic() < deadline:
                    try:
                        done[(await client.post("/v1/completions", json=bad)).status_code] += 1
                    except httpx.TransportError as exc:
                        errors[type(exc).__name__] += 1

            await asyncio.gather(*(one() for _ in range(255)))
        return sum(done.values()), errors

    out = {}
    for seconds in args.keep_alive_values:
        requests, errors = 0, Counter()
        with TrainerProcess(env={"TRAINER_KEEP_ALIVE_S": str(seconds)}) as trainer:
            for _ in range(args.keep_alive_storms):
                answered, failed = asyncio.run(storm(trainer.url))
                requests, errors = requests + answered + sum(failed.values()), errors + failed
        out[str(seconds)] = {"requests": requests, "dropped": sum(errors.values()), "errors": dict(errors)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--teacher-steps", type=int, default=3)
    parser.add_argument("--checkpoint-budget-mb", type=int, default=400)
    parser.add_argument("--checkpoint-steps", type=int, default=8, help="saves per job series (two series)")
    parser.add_argument("--checkpoint-named", type=int, default=20, help="named saves after them")
    parser.add_argument("--fuzz-examples", type=int, default=25)
    parser.add_argument("--load-s", type=float, default=30.0)
    parser.add_argument("--load-max-tokens", type=int, default=2, help="of each chat completion under load")
    parser.add_argument("--keep-alive-values", type=int, nargs="+", default=[5, 2, 75])
    parser.add_argument("--keep-alive-storms", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reliability.json")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    runners = {
        "dead_teacher": dead_teacher,
        "checkpoint_disk": checkpoint_disk,
        "schemathesis": schemathesis_phase,
        "streaming": streaming,
        "load": load,
        "keep_alive": keep_alive,
    }
    result: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.setdefault("phases", {})
    for phase in phases:
        started = time.perf_counter()
        load_before = os.getloadavg()
        print(f"[reliability] {phase} ...", flush=True)
        figures = runners[phase](args)
        figures["seconds"] = round(time.perf_counter() - started, 1)
        figures["load_average_before"] = [round(x, 2) for x in load_before]
        figures["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        figures["command"] = "python bench/reliability_bench.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        result["phases"][phase] = figures
        print(json.dumps(figures, indent=1)[:3000], flush=True)
        result.update(summary(result["phases"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(result, indent=1) + "\n"
        )  # after every phase: a cut run keeps its figures
    return result


def summary(phases: dict) -> dict:
    """The headline figures issue #18 asks for, from whichever phases have run."""
    out = {
        "bench": "reliability",
        "machine": describe_machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/reliability_bench.py (each phase records its own command and date)",
    }
    if "dead_teacher" in phases:
        out["dead_teacher_pick_share_last_step"] = phases["dead_teacher"]["dead_pick_share_per_step"][-1]
    if "checkpoint_disk" in phases:
        out["checkpoint_disk_bounded"] = phases["checkpoint_disk"]["bounded"]
    if "schemathesis" in phases:
        out["schemathesis_conformance_failures"] = phases["schemathesis"]["conformance_failures"]
    if "streaming" in phases:
        out["streaming_ok"] = phases["streaming"]["ok"]
    if "load" in phases:
        out["load_255_dropped"] = phases["load"]["255"]["dropped"]
        out["load_512_dropped"] = phases["load"]["512"]["dropped"]
    if "keep_alive" in phases:
        out["keep_alive_dropped"] = {
            k: v["dropped"] for k, v in phases["keep_alive"].items() if isinstance(v, dict) and "dropped" in v
        }
    return out


if __name__ == "__main__":
    main()
