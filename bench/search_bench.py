"""Search-core benchmark: orchestrator overhead, requests in flight and critical-path efficiency.

Three measurements against the scripted OpenAI-compatible server (tests/support/scripted_server.py):
1. overhead, in-process: the endpoints answer instantly through an in-process httpx transport that calls the
   server's script; expansions per CPU-second of the search process, with the script's own time taken out.
   This is the orchestrator's overhead per expansion (search logic + httpx client + JSON), no network.
2. overhead, loopback HTTP: the same with the server as a separate process on 127.0.0.1; expansions per
   CPU-second of the search process (so it includes the client side of real HTTP: sockets, h11 parsing).
3. slow endpoints (every request takes --latency-ms): (a) many trees at once, the peak number of requests in
   flight as the server counts them; (b) one search, its wall time over the sum of latencies on its critical
   path (the longest chain of requests that had to wait for each other, as the search records it).

Usage: .venv/bin/python bench/search_bench.py [--quick] [--out bench/results/search.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.scripted_server import ScriptedServer, ServerConfig, admin  # noqa: E402

from orchestrator.data import Problem  # noqa: E402
from orchestrator.llm import LLMPool, RetryPolicy  # noqa: E402
from orchestrator.search import SearchConfig, SearchServices, run_search, run_searches  # noqa: E402
from orchestrator.settings import EndpointSpec  # noqa: E402
from orchestrator.teachers import TeacherEnsemble  # noqa: E402
from orchestrator.terminal import TerminalChecker  # noqa: E402
from orchestrator.trainer_client import TrainerClient  # noqa: E402


class ScriptTransport(httpx.AsyncBaseTransport):
    """An 'instant endpoint' inside this process: the scripted server's script without sockets."""

    def __init__(self, server: ScriptedServer):
        self.server = server
        self.script_s = 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.process_time()
        payload = json.loads(request.content) if request.content else {}
        path = request.url.path
        body = json.dumps(self.server._route(path, payload, with_logprobs=True) or {}).encode()
        self.script_s += time.process_time() - started
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})


def problems(n: int) -> list[Problem]:
    return [
        Problem(id=f"bench-{i}", prompt=f"Tom has {i} apples and buys {42 - i} more. How many?", answer="42")
        for i in range(n)
    ]


def services(base: str, pool: LLMPool, trainer: TrainerClient, timeout_s: float = 30.0) -> SearchServices:
    def ep(name: str) -> EndpointSpec:
        return EndpointSpec(
            name=name, base_url=base + "/v1", model=name, timeout_s=timeout_s, max_concurrency=4096
        )

    return SearchServices(
        pool=pool,
        teachers=TeacherEnsemble([ep("t1"), ep("t2")], seed=0),
        checker=TerminalChecker(pool, ep("checker")),
        student=ep("student"),
        trainer=trainer,
    )


def bench_config(args) -> SearchConfig:
    return SearchConfig(
        iterations=args.iterations,
        max_depth=args.depth,
        parallel_simulations=args.parallel,
        n_student=2,
        n_teacher_right=1,
        n_teacher_wrong=1,
        rollout=True,
        rollouts=args.rollouts,
        chunk_tokens=32,
    )


class TimedClient(httpx.AsyncClient):
    """Counts the CPU time spent inside `send`. With the in-process transport nothing in there waits, so the
    time is the HTTP client's (plus the script's, counted separately by ScriptTransport)."""

    send_s = 0.0

    async def send(self, request, **kwargs):
        started = time.process_time()
        try:
            return await super().send(request, **kwargs)
        finally:
            TimedClient.send_s += time.process_time() - started


async def overhead_in_process(args) -> dict:
    server = ScriptedServer(ServerConfig(answer_depth=args.answer_depth, keep_log=False))
    transport = ScriptTransport(server)
    httpx_client, httpx.AsyncClient = httpx.AsyncClient, TimedClient  # both clients below time their sends
    async with (
        LLMPool(max_in_flight=4096, retry=RetryPolicy(max_retries=0), transport=transport) as pool,
        TrainerClient("http://bench", transport=transport) as trainer,
    ):
        svc = services("http://bench", pool, trainer)
        await run_searches(problems(4), bench_config(args), svc, max_trees_in_flight=4)  # warm-up
        transport.script_s, TimedClient.send_s = 0.0, 0.0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await run_searches(
            problems(args.trees), bench_config(args), svc, max_trees_in_flight=args.trees_in_flight
        )
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    httpx.AsyncClient = httpx_client
    expansions = sum(r.stats["expansions"] for r in results)
    requests = sum(r.stats["requests"] for r in results)
    overhead = cpu - transport.script_s
    search_logic = cpu - TimedClient.send_s
    return {
        "expansions": expansions,
        "requests": requests,
        "cpu_s": cpu,
        "script_cpu_s": transport.script_s,
        "httpx_send_cpu_s": TimedClient.send_s - transport.script_s,
        "overhead_cpu_s": overhead,
        "search_logic_cpu_s": search_logic,
        "wall_s": wall,
        "expansions_per_s": expansions / overhead,
        "expansions_per_s_search_logic": expansions / search_logic,
        "requests_per_expansion": requests / expansions,
        "nodes": sum(r.stats["nodes"] for r in results),
    }


def start_server(latency_ms: float, answer_depth: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests/support/scripted_server.py"),
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
            "--answer-depth",
            str(answer_depth),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"scripted server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


async def overhead_http(args, url: str) -> dict:
    async with (
        LLMPool(max_in_flight=4096, retry=RetryPolicy(max_retries=0)) as pool,
        TrainerClient(url) as trainer,
    ):
        svc = services(url, pool, trainer)
        await run_searches(problems(4), bench_config(args), svc, max_trees_in_flight=4)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await run_searches(
            problems(args.trees), bench_config(args), svc, max_trees_in_flight=args.trees_in_flight
        )
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    expansions = sum(r.stats["expansions"] for r in results)
    return {
        "expansions": expansions,
        "cpu_s": cpu,
        "wall_s": wall,
        "expansions_per_cpu_s": expansions / cpu,
        "expansions_per_wall_s": expansions / wall,
    }


async def slow_in_flight(args, url: str) -> dict:
    admin(url, "reset")
    async with (
        LLMPool(max_in_flight=args.max_in_flight, retry=RetryPolicy(max_retries=0)) as pool,
        TrainerClient(url) as trainer,
    ):
        svc = services(url, pool, trainer)
        config = bench_config(args).model_copy(update={"iterations": 8})
        wall0 = time.perf_counter()
        results = await run_searches(
            problems(args.slow_trees), config, svc, max_trees_in_flight=args.slow_trees
        )
        wall = time.perf_counter() - wall0
        pool_peak = pool.max_in_flight
    server = admin(url, "stats")
    return {
        "trees": args.slow_trees,
        "wall_s": wall,
        "pool_max_in_flight": pool_peak,
        "server_max_in_flight": server["max_in_flight"],
        "requests": server["total"],
        "expansions": sum(r.stats["expansions"] for r in results),
    }


async def slow_critical_path(args, url: str) -> dict:
    async with (
        LLMPool(max_in_flight=args.max_in_flight, retry=RetryPolicy(max_retries=0)) as pool,
        TrainerClient(url) as trainer,
    ):
        svc = services(url, pool, trainer)
        config = bench_config(args).model_copy(
            update={"iterations": args.cp_iterations, "parallel_simulations": args.cp_parallel}
        )
        wall0 = time.perf_counter()
        result = await run_search(problems(1)[0], config, svc)
        wall = time.perf_counter() - wall0
    cp = result.stats["critical_path_s"]
    return {
        "wall_s": wall,
        "critical_path_s": cp,
        "critical_path_ratio": wall / cp,
        "critical_path_requests": round(cp / (args.latency_ms / 1000.0), 2),
        "expansions": result.stats["expansions"],
        "requests": result.stats["requests"],
        "iterations": config.iterations,
        "parallel_simulations": config.parallel_simulations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", type=int, default=64)
    parser.add_argument("--trees-in-flight", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rollouts", choices=["best", "all"], default="best")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--answer-depth", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--slow-trees", type=int, default=32)
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--cp-iterations", type=int, default=16)
    parser.add_argument("--cp-parallel", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=str(REPO / "bench/results/search.json"))
    args = parser.parse_args()
    if args.quick:
        args.trees, args.slow_trees, args.cp_iterations = 8, 8, 8

    load_before = os.getloadavg()
    in_process = asyncio.run(overhead_in_process(args))
    print("in-process overhead:", json.dumps(in_process), flush=True)
    proc, url = start_server(0.0, args.answer_depth)
    try:
        http = asyncio.run(overhead_http(args, url))
    finally:
        proc.terminate()
        proc.wait(10)
    print("loopback HTTP:", json.dumps(http), flush=True)
    proc, url = start_server(args.latency_ms, args.answer_depth)
    try:
        in_flight = asyncio.run(slow_in_flight(args, url))
        print("slow, many trees:", json.dumps(in_flight), flush=True)
        critical = asyncio.run(slow_critical_path(args, url))
        print("slow, one search:", json.dumps(critical), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)

    result = {
        "expansions_per_s": round(in_process["expansions_per_s"], 1),
        "expansions_per_s_search_logic": round(in_process["expansions_per_s_search_logic"], 1),
        "expansions_per_cpu_s_loopback_http": round(http["expansions_per_cpu_s"], 1),
        "max_in_flight": in_flight["server_max_in_flight"],
        "critical_path_ratio": round(critical["critical_path_ratio"], 3),
        "latency_ms": args.latency_ms,
        "details": {
            "in_process": in_process,
            "loopback_http": http,
            "slow_many_trees": in_flight,
            "slow_one_search": critical,
        },
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
