"""Load: a storm of concurrent POST /train and POST /eval against the real embedded system on loopback.

The trainer (tiny model) and the orchestrator (embedded tier: the trainer's "base" is teacher and checker) run as
processes. Waves of concurrent job submissions go in while /health is polled; the script reports what the
services held: requests sent, accepted (202), refused (429), anything else, the peak resident memory of each
service (sampled from /proc every 50 ms), and the /health latency during the storm. Accepted jobs run for a
while against the real trainer and are then cancelled, so the run is bounded.

    .venv/bin/python bench/load_bench.py            # writes bench/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.local.machine import describe_machine
from orchestrator.local.processes import free_port, orchestrator_process, trainer_process



def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS(threading.Thread):
    """Samples the resident memory of some processes until stopped; keeps the peak of each."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.05):
        super().__init__(daemon=True)
        self.pids, self.every_s = pids, every_s
        self.peak = {name: rss_bytes(pid) for name, pid in pids.items()}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_bytes(pid))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def job_bodies(count: int) -> list[tuple[str, dict]]:
    """Small real jobs, half train and half eval, so the accepted ones do work against the trainer."""
    train = ("/train", {"num_examples": 1, "batch_size": 1, "search": {"iterations": 2, "max_depth": 2}})
    evaluate = ("/eval", {"num_examples": 2, "max_tokens": 32})
    return [train if i % 2 else evaluate for i in range(count)]


async def storm(url: str, headers: dict, waves: int, per_wave: int, gap_s: float, health_every_s: float):
    """`waves` waves of `per_wave` concurrent submissions, `gap_s` apart, while /health is polled."""
    latencies: list[float] = []
    health_codes: Counter = Counter()
    responses: list[tuple[float, httpx.Response]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=per_wave + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:

        async def poll_health():
            async with httpx.AsyncClient(base_url=url, timeout=60) as health_client:
                while not stop.is_set():
                    started = time.perf_counter()
                    response = await health_client.get("/health")
                    latencies.append(time.perf_counter() - started)
                    health_codes[response.status_code] += 1
                    await asyncio.sleep(health_every_s)

        async def submit(route: str, body: dict):
            started = time.perf_counter()
            response = await client.post(route, json=body)
            responses.append((time.perf_counter() - started, response))

        poller = asyncio.create_task(poll_health())
        started = time.perf_counter()
        for wave in range(waves):
            await asyncio.gather(*(submit(r, b) for r, b in job_bodies(per_wave)))
            if wave < waves - 1:
                await asyncio.sleep(gap_s)
        storm_s = time.perf_counter() - started
        await asyncio.sleep(health_every_s * 3)  # a few polls after the last wave
        stop.set()
        await poller
    return responses, latencies, health_codes, storm_s


async def trainer_storm(url: str, headers: dict, requests: int, max_tokens: int, health_every_s: float):
    """`requests` concurrent chat completions straight at the trainer while its /health is polled."""
    body = {
        "model": "student",
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
    }
    latencies: list[float] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=requests + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:

        async def poll_health():
            while not stop.is_set():
                started = time.perf_counter()
                await client.get("/health")
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(health_every_s)

        poller = asyncio.create_task(poll_health())
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(requests))
        )
        wall_s = time.perf_counter() - started
        stop.set()
        await poller
    return responses, latencies, wall_s


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--per-wave", type=int, default=50, help="concurrent submissions per wave")
    parser.add_argument("--gap-s", type=float, default=2.0, help="pause between waves")
    parser.add_argument(
        "--run-s", type=float, default=30.0, help="let accepted jobs run this long, then cancel"
    )
    parser.add_argument("--max-queued-jobs", type=int, default=16)
    parser.add_argument(
        "--trainer-requests", type=int, default=64, help="concurrent completions at the trainer"
    )
    parser.add_argument("--trainer-max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.json")
    args = parser.parse_args(argv)

    token = "load-bench"
    headers = {"Authorization": f"Bearer {token}"}
    workdir = Path(tempfile.mkdtemp(prefix="azt-load-"))
    trainer_port, orch_port = free_port(), free_port()
    trainer = trainer_process(trainer_port, workdir, env={"API_TOKEN": token}, cwd=REPO)
    env = {
        "API_TOKEN": token,
        "MAX_CONCURRENT_JOBS": "1",
        "MAX_QUEUED_JOBS": str(args.max_queued_jobs),
    }
    orchestrator = orchestrator_process(orch_port, trainer.url, workdir, env=env, cwd=REPO)
    load_before = os.getloadavg()
    with trainer, orchestrator:
        trainer.wait_ready(600)
        orchestrator.wait_ready(60)
        pids = {"orchestrator": orchestrator.proc.pid, "trainer": trainer.proc.pid}
        idle_rss = {name: rss_bytes(pid) for name, pid in pids.items()}
        sampler = PeakRSS(pids)
        sampler.start()
        responses, latencies, health_codes, storm_s = asyncio.run(
            storm(orchestrator.url, headers, args.waves, args.per_wave, args.gap_s, health_every_s=0.1)
        )
        codes = Counter(r.status_code for _, r in responses)
        accepted = [r.json()["job_id"] for _, r in responses if r.status_code == 202]
        time.sleep(args.run_s)  # the accepted jobs work against the real trainer meanwhile
        with httpx.Client(base_url=orchestrator.url, headers=headers, timeout=60) as http:
            statuses_before_cancel = Counter(http.get(f"/jobs/{j}").json()["status"] for j in accepted)
            cancel_codes = Counter(http.post(f"/jobs/{j}/cancel").status_code for j in accepted)
            final = Counter(http.get(f"/jobs/{j}").json()["status"] for j in accepted)
        peak_jobs = dict(sampler.peak)
        # Part two: the trainer alone under a storm of completion requests (its jobs are all cancelled now).
        completions, trainer_latencies, trainer_wall_s = asyncio.run(
            trainer_storm(
                trainer.url, headers, args.trainer_requests, args.trainer_max_tokens, health_every_s=0.1
            )
        )
        sampler.done.set()
        sampler.join()
        after_rss = {name: rss_bytes(pid) for name, pid in pids.items()}
        completion_codes = Counter(r.status_code for r in completions)
        tokens = sum(r.json()["usage"]["completion_tokens"] for r in completions if r.status_code == 200)
    submit_latencies = [s for s, _ in responses]
    mib = 2**20
    result = {
        "bench": "load",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe_machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python bench/load_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "waves": args.waves,
            "per_wave": args.per_wave,
            "gap_s": args.gap_s,
            "MAX_CONCURRENT_JOBS": 1,
            "MAX_QUEUED_JOBS": args.max_queued_jobs,
            "jobs": dict(job_bodies(2)),
            "teacher_tier": "embedded (trainer 'base' is teacher and checker; tiny SmolLM2-135M on CPU)",
        },
        "requests_sent": len(responses),
        "accepted_202": codes.get(202, 0),
        "refused_429": codes.get(429, 0),
        "other_status": {str(k): v for k, v in codes.items() if k not in (202, 429)},
        "storm_s": round(storm_s, 2),
        "submit_latency_s": {
            "p50": round(percentile(submit_latencies, 0.5), 4),
            "p99": round(percentile(submit_latencies, 0.99), 4),
            "max": round(max(submit_latencies), 4),
        },
        "health_during_storm": {
            "polls": len(latencies),
            "status_codes": {str(k): v for k, v in health_codes.items()},
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "max_ms": round(1000 * max(latencies), 1),
        },
        "accepted_jobs_after_run_s": {
            "run_s": args.run_s,
            "statuses": dict(statuses_before_cancel),
            "cancel_status_codes": {str(k): v for k, v in cancel_codes.items()},
            "final_statuses": dict(final),
        },
        "rss_mib": {
            name: {
                "idle": round(idle_rss[name] / mib, 1),
                "peak_job_storm": round(peak_jobs[name] / mib, 1),
                "peak": round(sampler.peak[name] / mib, 1),
                "after": round(after_rss[name] / mib, 1),
            }
            for name in pids
        },
        "trainer_storm": {
            "requests": args.trainer_requests,
            "max_tokens": args.trainer_max_tokens,
            "status_codes": {str(k): v for k, v in completion_codes.items()},
            "completion_tokens": tokens,
            "wall_s": round(trainer_wall_s, 1),
            "health_polls": len(trainer_latencies),
            "health_p50_ms": round(1000 * statistics.median(trainer_latencies), 1),
            "health_p99_ms": round(1000 * percentile(trainer_latencies, 0.99), 1),
            "health_max_ms": round(1000 * max(trainer_latencies), 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
