"""The search a config asks for: `shape` "fork" (fork.py, the default) or "line" (mcts.py)."""

from __future__ import annotations

import asyncio

from orchestrator.gsm8k.data import Problem
from orchestrator.search.fork import run_fork_search
from orchestrator.search.mcts import run_line_search
from orchestrator.search.services import SearchResult, SearchServices
from orchestrator.settings import SearchConfig


async def run_search(
    problem: Problem, config: SearchConfig, services: SearchServices, cancel: asyncio.Event | None = None
) -> SearchResult:
    """Grow one tree for `problem` with the search of `config.shape`; returns it with stats (also when
    cancelled)."""
    if config.shape == "fork":
        return await run_fork_search(problem, config, services, cancel)
    return await run_line_search(problem, config, services, cancel)


async def run_searches(
    problems: list[Problem],
    config: SearchConfig,
    services: SearchServices,
    max_trees_in_flight: int = 256,
    cancel: asyncio.Event | None = None,
) -> list[SearchResult]:
    """Many trees at once, at most `max_trees_in_flight` growing together (the pool bounds requests)."""
    gate = asyncio.Semaphore(max_trees_in_flight)

    async def one(problem: Problem) -> SearchResult:
        async with gate:
            return await run_search(problem, config, services, cancel)

    return list(await asyncio.gather(*(one(p) for p in problems)))
