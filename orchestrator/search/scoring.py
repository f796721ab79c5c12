"""The student's log-probs of teacher steps, from the trainer's POST /logprobs, merged across searches.

Every expansion with teacher steps asks for their student log-probs (the priors and the PRE of those steps);
`ScoreBatcher` merges the calls made in one turn of the event loop into one request.
"""

from __future__ import annotations

import asyncio

from orchestrator.clients.trainer import TrainerClient
from services.protocol import CompletionScore, ModelName


class ScoreBatcher:
    """Merges the trainer's POST /logprobs calls made in one turn of the event loop, by any simulation of any
    tree that shares these services, into one request of at most `max_items` items.

    Every expansion with teacher steps asks for their student log-probs; with many simulations in flight
    those calls come together, and one HTTP exchange per call cost the orchestrator more CPU than anything
    else in scoring (the trainer batches the rows anyway). Nothing waits for company: the merged request
    goes out on the loop's next turn, so a lone call is not delayed. A failed request fails each of its
    callers; when every caller of a request in flight is cancelled, the request is cancelled too."""

    def __init__(self, trainer: TrainerClient, max_items: int = 32):
        self.trainer, self.max_items = trainer, max_items
        self._waiting: list[tuple[ModelName, list[dict], asyncio.Future]] = []
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0  # score() calls
        self.requests = 0  # HTTP requests they became

    async def score(self, items: list[dict], model: ModelName = "student") -> list[CompletionScore]:
        """The trainer's `results` for `items`, in order (raises what `TrainerClient.logprobs` raises)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._flush_loop is not loop:
            # No flush pending here. Calls left by a loop that ended before its flush ran are dropped (their
            # futures belong to that loop), so services can outlive one `asyncio.run`.
            self._waiting, self._flush_loop = [], loop
            loop.call_soon(self._flush)
        self._waiting.append((model, items, future))
        self.calls += 1
        return await future

    def _flush(self) -> None:
        waiting, self._waiting, self._flush_loop = self._waiting, [], None
        open_batches: dict[ModelName, tuple[list, int]] = {}  # per model: [(items, future)], item count
        for model, items, future in waiting:
            if future.done():  # its caller was cancelled before the request went out
                continue
            batch, size = open_batches.get(model, ([], 0))
            if batch and size + len(items) > self.max_items:
                self._send(model, batch)
                batch, size = [], 0
            batch.append((items, future))
            open_batches[model] = (batch, size + len(items))
        for model, (batch, _) in open_batches.items():
            self._send(model, batch)

    def _send(self, model: ModelName, batch: list[tuple[list[dict], asyncio.Future]]) -> None:
        task = asyncio.get_running_loop().create_task(self._request(model, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def abandon(_: asyncio.Future) -> None:
            if not task.done() and all(f.cancelled() for _, f in batch):
                task.cancel()

        for _, future in batch:
            future.add_done_callback(abandon)

    async def _request(self, model: ModelName, batch: list[tuple[list[dict], asyncio.Future]]) -> None:
        self.requests += 1
        try:
            response = await self.trainer.logprobs([item for items, _ in batch for item in items], model)
            results = response.results
        except Exception as exc:  # each caller handles it as if it had made the request alone
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for items, future in batch:
            if not future.done():
                future.set_result(results[start : start + len(items)])
            start += len(items)
