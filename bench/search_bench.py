"""Search-core benchmark: orchestrator overhead, requests in flight and critical-path efficiency.

Three measurements against the scripted OpenAI-compatible server (tests/support/scripted_server.py):
1. overhead, in-process (the headline figure): the endpoints answer instantly through an in-process httpx
   transport that runs the server's script; expansions per CPU-second of the search process with the
   script's own CPU (decode the request, run the script, encode the response) taken out:
       expansions_per_s = expansions / (process CPU seconds - script CPU seconds)
   i.e. the orchestrator's overhead per expansion (search logic, the pool's HTTP client side, JSON) with no
   sockets and no server. Nothing waits in this run, so the process's wall time equals its CPU time.
   The same search is run, interleaved, with the request path as it was before 2026-11-25 (every request
   through `httpx.AsyncClient.send`, one trainer request per /logprobs call), for a before/after ratio
   under the same load.
2. overhead, loopback HTTP: the same with the server as a separate process on 127.0.0.1; expansions per
   CPU-second of the search process (so it includes the client side of real HTTP: sockets and the HTTP
   client) and per wall-second (the server shares the 2 cores, so wall time includes its CPU). Run with each
   HTTP client of CLIENTS, interleaved `repeats` times; medians: the pool's own (httpx over httpx-aiohttp,
   orchestrator/clients/http.py) on asyncio's loop and on uvloop (what `azt serve` runs), and httpx's default
   transport (httpcore). (The run of 2026-11-30 19:10 UTC also had the hand-written transport the library
   replaced, from a copy deleted after it: bench/RESULTS.md.) Also the pool alone: client CPU microseconds per `LLMPool.complete` at 1 and
   at 32 requests in flight (2000 requests each), every client.
3. slow endpoints (every request takes --latency-ms): (a) many trees at once, the peak number of requests in
   flight as the server counts them; (b) one search, its wall time over the sum of latencies on its critical
   path (the longest chain of requests that had to wait for each other, as the search records it).

Usage: .venv/bin/python bench/search_bench.py [--quick] [--repeats 3] [--out bench/results/search.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.scripted_server import ScriptedServer, ServerConfig, admin  # noqa: E402

import orchestrator.clients.llm  # noqa: E402
from orchestrator.gsm8k.data import Problem  # noqa: E402
from orchestrator.clients.llm import LLMPool, RetryPolicy  # noqa: E402
from orchestrator.search.services import SearchServices  # noqa: E402
from orchestrator.search.shapes import run_search, run_searches  # noqa: E402
from orchestrator.search.scoring import ScoreBatcher  # noqa: E402
from orchestrator.settings import EndpointSpec, SearchConfig  # noqa: E402
from orchestrator.search.teachers import TeacherEnsemble  # noqa: E402
from orchestrator.search.terminal import TerminalChecker  # noqa: E402
from orchestrator.clients.trainer import TrainerClient  # noqa: E402
from orchestrator.clients.http import describe as describe_http_client  # noqa: E402


class ScriptTransport(httpx.AsyncBaseTransport):
    """An 'instant endpoint' inside this process: the scripted server's script without sockets. Its own CPU
    time (request JSON decode, the script, response JSON encode and Response object) is counted apart."""

    def __init__(self, server: ScriptedServer):
        self.server = server
        self.script_s = 0.0
        self.requests: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.process_time()
        payload = json.loads(request.content) if request.content else {}
        path = request.url.path
        self.requests[path] = self.requests.get(path, 0) + 1
        body = json.dumps(self.server._route(path, payload, with_logprobs=True) or {}).encode()
        response = httpx.Response(200, content=body, headers={"content-type": "application/json"})
        self.script_s += time.process_time() - started
        return response


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
        shape="line",
        use_checker=True,
        max_tokens=1024,
        temperature=0.8,
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


async def _post_through_client(self, target, headers, content):
    """The pool's request path before 2026-11-25: an httpx.Request with content= and a header dict, sent with
    `httpx.AsyncClient.send` (URL handling, default headers, cookies, auth and redirect handling, logging)."""
    request = httpx.Request(
        "POST",
        target.url,
        content=content,
        headers={k.decode(): v.decode() for k, v in headers if k not in (b"Host", b"Content-Length")},
        extensions=target.extensions,
    )
    response = await self.client.send(request)
    return response.status_code, response.content, response


async def _score_unmerged(self, items, model="student"):
    """/logprobs before 2026-11-25: one trainer request per call."""
    self.calls += 1
    self.requests += 1
    return (await self.trainer.logprobs(items, model)).results


class request_path:
    """Context manager: the search runs with the request path it had before 2026-11-25 (`client_send`: every
    request through httpx.AsyncClient.send; `merge`: False = one trainer request per /logprobs call), for
    side-by-side ratios in one invocation; the search logic itself is this commit's."""

    def __init__(self, client_send: bool, merge: bool):
        self.client_send, self.merge = client_send, merge

    def __enter__(self):
        self.saved = orchestrator.clients.llm._Server.post, ScoreBatcher.score
        if self.client_send:
            orchestrator.clients.llm._Server.post = _post_through_client
        if not self.merge:
            ScoreBatcher.score = _score_unmerged

    def __exit__(self, *exc):
        orchestrator.clients.llm._Server.post, ScoreBatcher.score = self.saved


VARIANTS = {  # name: request_path arguments
    "current": (False, True),
    "unmerged_logprobs": (False, False),  # this commit's pool, one trainer request per /logprobs call
    "reference": (True, False),  # the request path before 2026-11-25
}


async def overhead_in_process(args) -> dict:
    server = ScriptedServer(ServerConfig(answer_depth=args.answer_depth, keep_log=False))
    transport = ScriptTransport(server)
    async with (
        LLMPool(max_in_flight=4096, retry=RetryPolicy(max_retries=0), transport=transport) as pool,
        TrainerClient("http://bench", transport=transport) as trainer,
    ):
        svc = services("http://bench", pool, trainer)
        await run_searches(problems(4), bench_config(args), svc, max_trees_in_flight=4)  # warm-up
        transport.script_s, transport.requests = 0.0, {}
        calls0, requests0 = svc.scorer.calls, svc.scorer.requests
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await run_searches(
            problems(args.trees), bench_config(args), svc, max_trees_in_flight=args.trees_in_flight
        )
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    expansions = sum(r.stats["expansions"] for r in results)
    http_requests = sum(transport.requests.values())
    overhead = cpu - transport.script_s
    return {
        "expansions": expansions,
        "http_requests": http_requests,
        "http_requests_per_expansion": http_requests / expansions,
        "search_requests_per_expansion": sum(r.stats["requests"] for r in results) / expansions,
        "logprobs_calls": svc.scorer.calls - calls0,
        "logprobs_requests": svc.scorer.requests - requests0,
        "cpu_s": cpu,
        "script_cpu_s": transport.script_s,
        "overhead_cpu_s": overhead,
        "wall_s": wall,
        "expansions_per_s": expansions / overhead,
        "overhead_us_per_expansion": 1e6 * overhead / expansions,
        "nodes": sum(r.stats["nodes"] for r in results),
    }


def overhead_side_by_side(args) -> dict:
    """This commit's request path and the reference ones, interleaved `repeats` times; medians, and the
    median of the per-round ratios to the reference (each round's runs see about the same machine load)."""
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (client_send, merge) in VARIANTS.items():
            with request_path(client_send, merge):
                runs[name].append(asyncio.run(overhead_in_process(args)))
    out: dict = {}
    for name in VARIANTS:
        out[name] = statistics.median(r["expansions_per_s"] for r in runs[name])
        if name == "reference":
            continue
        ratios = [
            a["expansions_per_s"] / b["expansions_per_s"] for a, b in zip(runs[name], runs["reference"])
        ]
        out[f"{name}_over_reference"] = statistics.median(ratios)
    out["runs"] = runs
    return out


# The HTTP clients of the loopback parts: name -> (event loop runner, transport for the pool and the trainer
# client; None = the pool's own, httpx over httpx-aiohttp).
CLIENTS = {
    "aiohttp": (asyncio.run, None),
    "aiohttp_uvloop": (uvloop.run, None),
    "httpcore": (
        asyncio.run,
        lambda: httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=4096)),
    ),
}


def http_side_by_side(args, url: str, server_pid: int) -> dict:
    """Loopback HTTP with every client of CLIENTS, interleaved; medians per client."""
    runs: dict[str, list[dict]] = {name: [] for name in CLIENTS}
    for _ in range(args.repeats):
        for name, (run, transport) in CLIENTS.items():
            runs[name].append(run(overhead_http(args, url, server_pid, transport)))
    out: dict = {"runs": runs}
    for name, rs in runs.items():
        for key in ("expansions_per_cpu_s", "expansions_per_wall_s"):
            out[f"{name}_{key}"] = statistics.median(r[key] for r in rs)
    return out


async def pool_request_cost(url: str, transport, requests: int = 2000) -> dict:
    """Client CPU per pool request (no search) against the zero-latency server, at 1 and 32 in flight."""
    ep = EndpointSpec(name="s", base_url=url + "/v1", model="m", max_concurrency=64)
    out = {}
    async with LLMPool(transport=transport() if transport else None) as pool:
        for _ in range(50):  # warm: connections open, JSON encoder and routes built
            await pool.complete(ep, "hi", max_tokens=8)
        for concurrency in (1, 32):
            limit = asyncio.Semaphore(concurrency)

            async def one(limit: asyncio.Semaphore) -> None:
                async with limit:
                    await pool.complete(ep, "hi", max_tokens=8)

            cpu0 = time.process_time()
            await asyncio.gather(*(one(limit) for _ in range(requests)))
            out[f"client_cpu_us_per_request_at_{concurrency}"] = 1e6 * (time.process_time() - cpu0) / requests
    return out


def pool_cost_side_by_side(args, url: str) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in CLIENTS}
    for _ in range(args.repeats):
        for name, (run, transport) in CLIENTS.items():
            runs[name].append(run(pool_request_cost(url, transport)))
    return {
        f"{name}_{key}": statistics.median(r[key] for r in rs) for name, rs in runs.items() for key in rs[0]
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


def process_cpu_s(pid: int) -> float:
    """utime + stime of another process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def overhead_http(args, url: str, server_pid: int, transport=None) -> dict:
    async with (
        LLMPool(
            max_in_flight=4096, retry=RetryPolicy(max_retries=0), transport=transport() if transport else None
        ) as pool,
        TrainerClient(url, transport=transport() if transport else None) as trainer,  # the same client
    ):
        svc = services(url, pool, trainer)
        await run_searches(problems(4), bench_config(args), svc, max_trees_in_flight=4)
        server0 = process_cpu_s(server_pid)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await run_searches(
            problems(args.trees), bench_config(args), svc, max_trees_in_flight=args.trees_in_flight
        )
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        server_cpu = process_cpu_s(server_pid) - server0
    expansions = sum(r.stats["expansions"] for r in results)
    return {
        "expansions": expansions,
        "logprobs_calls_per_request": svc.scorer.calls / max(1, svc.scorer.requests),
        "cpu_s": cpu,
        "server_cpu_s": server_cpu,
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
        "logprobs_calls": svc.scorer.calls,
        "logprobs_requests": svc.scorer.requests,
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
    parser.add_argument("--repeats", type=int, default=3, help="in-process rounds (current + reference)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=str(REPO / "bench/results/search.json"))
    args = parser.parse_args()
    if args.quick:
        args.trees, args.slow_trees, args.cp_iterations, args.repeats = 8, 8, 8, 1

    load: dict[str, list[float]] = {"start": [round(x, 2) for x in os.getloadavg()]}
    side = overhead_side_by_side(args)
    in_process = side["runs"]["current"][-1]
    print("in-process overhead:", json.dumps({k: v for k, v in side.items() if k != "runs"}), flush=True)
    load["after_in_process"] = [round(x, 2) for x in os.getloadavg()]
    proc, url = start_server(0.0, args.answer_depth)
    try:
        http = http_side_by_side(args, url, proc.pid)
        pool_cost = pool_cost_side_by_side(args, url)
    finally:
        proc.terminate()
        proc.wait(10)
    print("loopback HTTP:", json.dumps({k: v for k, v in http.items() if k != "runs"}), flush=True)
    print("pool request cost:", json.dumps(pool_cost), flush=True)
    proc, url = start_server(args.latency_ms, args.answer_depth)
    try:
        in_flight = asyncio.run(slow_in_flight(args, url))
        print("slow, many trees:", json.dumps(in_flight), flush=True)
        critical = asyncio.run(slow_critical_path(args, url))
        print("slow, one search:", json.dumps(critical), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    load["end"] = [round(x, 2) for x in os.getloadavg()]

    result = {
        "expansions_per_s": round(side["current"], 1),
        "expansions_per_s_definition": "expansions / (search process CPU s - in-process script CPU s), instant "
        "in-process endpoint, median of the repeats",
        "overhead_us_per_expansion": round(1e6 / side["current"], 1),
        "unmerged_logprobs_expansions_per_s": round(side["unmerged_logprobs"], 1),
        "reference_expansions_per_s": round(side["reference"], 1),
        "ratio_over_reference": round(side["current_over_reference"], 3),
        "unmerged_logprobs_ratio_over_reference": round(side["unmerged_logprobs_over_reference"], 3),
        "logprobs_calls_per_request": round(
            in_process["logprobs_calls"] / in_process["logprobs_requests"], 2
        ),
        "http_requests_per_expansion": round(in_process["http_requests_per_expansion"], 3),
        "http_client": describe_http_client(),
        "event_loop": f"asyncio (Python {platform.python_version()}); aiohttp_uvloop: uvloop {uvloop.__version__}",
        "expansions_per_cpu_s_loopback_http": round(http["aiohttp_expansions_per_cpu_s"], 1),
        "expansions_per_wall_s_loopback_http": round(http["aiohttp_expansions_per_wall_s"], 1),
        "loopback_http_by_client": {
            name: {
                "expansions_per_cpu_s": round(http[f"{name}_expansions_per_cpu_s"], 1),
                "expansions_per_wall_s": round(http[f"{name}_expansions_per_wall_s"], 1),
            }
            for name in CLIENTS
        },
        "pool_client_cpu_us_per_request": {k: round(v, 1) for k, v in pool_cost.items()},
        "max_in_flight": in_flight["server_max_in_flight"],
        "critical_path_ratio": round(critical["critical_path_ratio"], 3),
        "latency_ms": args.latency_ms,
        "details": {
            "in_process": side["runs"],
            "loopback_http": http["runs"],
            "slow_many_trees": in_flight,
            "slow_one_search": critical,
        },
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_avg": load,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
