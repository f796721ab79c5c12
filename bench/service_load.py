"""Closed-loop load on an OpenAI-compatible completions server (the trainer service, vLLM), for the benchmarks.

    result = asyncio.run(closed_loop(url, in_flight=32, seconds=15, body=lambda client, i: {...}))
    result = closed_loop_processes(url, in_flight=255, seconds=15, body=CompletionBody(texts), processes=4)
    result = asyncio.run(sampling_workload(url, clients=32, seconds=12, prompt=...))
    result = asyncio.run(search_workload(url, clients=32, seconds=12, prompt=...))

A closed loop keeps `in_flight` requests outstanding: each client sends its next request as soon as its previous
one is answered, until `seconds` have passed; requests already sent then finish and count. tok_s = completion
tokens of answered requests / wall time from the first send to the last answer. Nothing is retried: a transport
error (connection reset, refused, protocol error) or a status other than 200 is counted by its kind, and that
client sends its next request.

The two workloads compare request shapes on one service at the same rows in flight (clients x 8 samples):
- sampling: what a GRPO arm sends, each request a fresh question with n=8 whole answers;
- search:   what the fork search sends, per tree node n=8 short steps from the node's text, then one short
            continuation from each of the 8 children (many n=1 requests whose prompts share the node's prefix); the
            first child becomes the next node, three levels deep, then a fresh question.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import gc
import multiprocessing
import random
import ssl
import statistics
import string
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

COMPLETIONS = "/v1/completions"


def text_prompt(rng: random.Random, characters: int) -> str:
    """Random lower-case words of about `characters` characters: no two prompts share a prefix by accident."""
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < characters:
        words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))))
    return " ".join(words)[:characters]


class LoadCounter:
    """Answers, tokens and failures of one measurement (shared by its clients; asyncio runs them on one thread)."""

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0
        self.rows = 0
        self.transport_errors: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.latencies: list[float] = []

    async def post(self, http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST a completion; its answer, or None after counting why there is none."""
        sent = time.perf_counter()
        try:
            response = await http.post(COMPLETIONS, json=body)
        except httpx.TransportError as exc:
            self.transport_errors[type(exc).__name__] += 1
            await asyncio.sleep(0.01)  # a server that is gone refuses at once: no busy loop of refusals
            return None
        if response.status_code != 200:
            self.statuses[response.status_code] += 1
            return None
        answer = response.json()
        self.latencies.append(time.perf_counter() - sent)
        self.requests += 1
        self.rows += len(answer["choices"])
        self.tokens += answer["usage"]["completion_tokens"]
        return answer

    def merge(self, other: LoadCounter) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.rows += other.rows
        self.transport_errors.update(other.transport_errors)
        self.statuses.update(other.statuses)
        self.latencies.extend(other.latencies)

    def report(self, wall: float, **extra: Any) -> dict[str, Any]:
        latencies = sorted(self.latencies) or [float("nan")]
        return {
            **extra,
            "tok_s": self.tokens / wall,
            "requests_s": self.requests / wall,
            "tokens": self.tokens,
            "requests": self.requests,
            "rows": self.rows,
            "wall_s": wall,
            "latency_mean_s": statistics.fmean(latencies),
            "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "connection_errors": sum(self.transport_errors.values()),
            "transport_errors": dict(self.transport_errors),
            "http_errors": {str(k): v for k, v in self.statuses.items()},
        }


def _client(url: str, connections: int, timeout: float) -> httpx.AsyncClient:
    """A client per simulated caller: one pool of hundreds of connections costs the client ~8 ms of CPU per
    request at 255 in flight (httpx's pool scans its connections), as much as the server spends. They share one
    TLS context (unused over http://, but httpx builds one per client otherwise: ~30 ms each)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, verify=_tls_context())


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


async def closed_loop(
    url: str,
    in_flight: int,
    seconds: float,
    body: Callable[[int, int], dict[str, Any]],
    timeout: float = 300.0,
) -> dict[str, Any]:
    """`in_flight` clients, each sending body(client, k) for its k-th request until `seconds` have passed."""
    counter, wall = await _closed_loop_counts(url, range(in_flight), seconds, body, timeout)
    return counter.report(wall, in_flight=in_flight)


async def _closed_loop_counts(
    url: str,
    clients: range,
    seconds: float,
    body: Callable[[int, int], dict[str, Any]],
    timeout: float = 300.0,
    start_at: float | None = None,
) -> tuple[LoadCounter, float]:
    if start_at is not None:  # clients in several processes start together
        await asyncio.sleep(max(start_at - time.monotonic(), 0.0))
    counter = LoadCounter()
    started = time.monotonic()
    deadline = started + seconds

    async def client(index: int) -> None:
        async with _client(url, 1, timeout) as http:
            k = 0
            while time.monotonic() < deadline:
                await counter.post(http, body(index, k))
                k += 1

    await asyncio.gather(*(client(i) for i in clients))
    return counter, time.monotonic() - started


@dataclasses.dataclass(frozen=True)
class CompletionBody:
    """body(client, k) of a closed loop that can cross to a client process: a completion of max_tokens sampled
    tokens from one of `texts`, prefixed so that no two requests share a prompt."""

    texts: tuple[str, ...]
    max_tokens: int = 128
    model: str = "student"

    def __call__(self, client: int, k: int) -> dict[str, Any]:
        text = self.texts[(client * 7 + k) % len(self.texts)]
        return {"model": self.model, "prompt": f"{client} {k} {text}", "max_tokens": self.max_tokens,
                "temperature": 1.0, "top_p": 1.0, "seed": client * 100_003 + k, "logprobs": 0}


def run_client_loop(coroutine):
    """asyncio.run with uvloop's event loop where it imports (the service's own loop under uvicorn): the client
    then costs less CPU per request than the server it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def closed_loop_processes(
    url: str,
    in_flight: int,
    seconds: float,
    body: Callable[[int, int], dict[str, Any]],
    processes: int,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """closed_loop with its clients split over `processes` client processes (body must pickle): at hundreds of
    requests a second one client process's event loop queues the answers of a burst, and that wait would count
    as the server's. Even one runs apart from the caller, whose heap (a benchmark's torch and model) would make
    its garbage collections long. The processes start their clients together; their counts are summed."""
    processes = max(processes, 1)
    shares = [range(p, in_flight, processes) for p in range(processes)]
    start_at = time.monotonic() + 5.0  # spawned processes import httpx and uvloop first
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = list(pool.map(_client_process, [(url, share, seconds, body, timeout, start_at) for share in shares]))
    counter = LoadCounter()
    for part, _ in parts:
        counter.merge(part)
    return counter.report(max(wall for _, wall in parts), in_flight=in_flight, client_processes=processes)


def _client_process(args: tuple) -> tuple[LoadCounter, float]:
    url, clients, seconds, body, timeout, start_at = args
    gc.freeze()  # what the client process imported is never walked by a collection again
    return run_client_loop(_closed_loop_counts(url, clients, seconds, body, timeout, start_at))


async def sampling_workload(
    url: str,
    clients: int,
    seconds: float,
    prompt: Callable[[int, int], str],
    *,
    n: int = 8,
    max_tokens: int = 128,
    model: str = "student",
) -> dict[str, Any]:
    """Each request a fresh prompt(client, k) with n samples of max_tokens (a GRPO arm's group)."""

    def body(client: int, k: int) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": prompt(client, k),
            "n": n,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": client * 100_003 + k,
            "logprobs": 0,
        }

    result = await closed_loop(url, clients, seconds, body)
    return {**result, "in_flight": clients * n, "workload": "sampling", "n": n, "max_tokens": max_tokens}


async def search_workload(
    url: str,
    clients: int,
    seconds: float,
    prompt: Callable[[int, int], str],
    *,
    n: int = 8,
    step_tokens: int = 32,
    depth: int = 3,
    model: str = "student",
) -> dict[str, Any]:
    """Per client, trees one after another: at each node one request for n steps (max step_tokens, stop at a
    newline) from the node's text, then n concurrent continuations (n=1, step_tokens) from node + child j, as
    rollouts from the children; the first child's text extends the node; `depth` levels, then a fresh prompt."""
    counter = LoadCounter()
    started = time.perf_counter()
    deadline = started + seconds
    seeds = iter(range(10**9))

    def body(text: str, samples: int) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": text,
            "n": samples,
            "max_tokens": step_tokens,
            "temperature": 1.0,
            "seed": next(seeds),
            "stop": ["\n"],
            "logprobs": 0,
        }

    async def client(index: int) -> None:
        async with _client(url, n, 300.0) as http:
            tree = 0
            while time.perf_counter() < deadline:
                node = prompt(index, tree)
                tree += 1
                for _ in range(depth):
                    if time.perf_counter() >= deadline:
                        break
                    answer = await counter.post(http, body(node, n))
                    children = [c["text"] for c in answer["choices"]] if answer else []
                    if not any(children):
                        break
                    await asyncio.gather(*(counter.post(http, body(node + child, 1)) for child in children))
                    node += children[0] or children[-1]

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    return {
        **counter.report(wall, in_flight=clients * n),
        "workload": "search",
        "n": n,
        "step_tokens": step_tokens,
        "depth": depth,
    }
