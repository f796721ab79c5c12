"""CUDA graphs of the decode step: captured once per shape, replayed at every step after.

A decode step of a small model is thousands of tiny kernels; launched one by one from Python it is bound by the
launches (H100/H200: 18-25 ms per step at any batch size), while replaying them as one captured graph costs a
few microseconds of CPU. Shapes are bucketed by the caller (rows, window), so a run needs a handful of graphs.

A captured function must read and write only tensors that outlive the graph (the engine's static buffers and the
slot cache) and must give the same result when run twice (the warm-up run before capture really executes).
Where capture fails (an operation that synchronises with the host, say) the failure is logged and the engine
keeps running eagerly: slower, never wrong. On CPU, and with graphs off, the function simply runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)


class StepGraphs:
    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available()
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.captures = 0  # graphs captured so far (a figure for benchmarks and tests)
        self.failure: str | None = None  # why capture was given up, if it was
        # Benchmarks set this to a list: each run then appends (key, start, end) CUDA events of its GPU work.
        self.timings: list[tuple[Hashable, torch.cuda.Event, torch.cuda.Event]] | None = None

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        timings = self.timings if torch.cuda.is_available() else None
        if timings is None:
            self._run(key, step)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self._run(key, step)
        end.record()
        timings.append((key, start, end))

    def _run(self, key: Hashable, step: Callable[[], None]) -> None:
        if not self.enabled:
            step()
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, step)
            if graph is None:
                step()
                return
        graph.replay()

    def clear(self) -> None:
        """Forget every graph (the tensors they captured were replaced), and their memory pool with them: the
        pool lives only as long as a graph that was captured into it, so a handle kept past the last graph names
        a released pool, and the next capture into it failed on the H200 with the caching allocator's
        `use_count > 0` assert (every graph of the lane was then given up)."""
        self._graphs.clear()
        self._pool = None

    def _capture(self, key: Hashable, step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up: lazy initialisations (cuBLAS workspaces) must not happen during capture
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                step()
        except Exception as exc:
            log.warning("CUDA graph capture of %s failed, decoding eagerly from now on: %r", key, exc)
            self.failure = f"{key}: {exc!r}"
            self.enabled = False
            self.clear()
            return None
        self._graphs[key] = graph
        self.captures += 1
        return graph
