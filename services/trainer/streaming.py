"""Streaming: the samples of generation requests as their tokens are decoded, as text deltas and the tokens behind
them, for the OpenAI chunks of `stream: true` (openai_format.py shapes them; the HTTP layer frames them).

    stream = SampleStream(tokenizer, jobs)          jobs get an on_token callback (items.OnToken)
    async for piece in stream.pieces(generate):     generate(job) -> (samples, adapter_version), one per job
        piece.prompt, piece.sample, piece.text, piece.tokens, piece.finished

Tokens reach the event loop from the worker thread through call_soon_threadsafe, in decode order, and before the
request's result (which the same thread resolves afterwards), so a sample's last piece always comes after its
text. What a piece may show (SampleText): the text of every token but the newest (it may be the end of sequence,
or complete a stop string the final text cuts), without a trailing incomplete character (U+FFFD while the bytes
of a character are still arriving) and without a tail that could begin a stop string. The sample's final text
(cut at its stop string) therefore begins with everything shown, and its last piece carries the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from .items import GenerationRequest, Sample

TokenInfo = tuple[int, float | None, list[tuple[int, float]] | None]  # token id, log-prob, top alternatives


@dataclass
class StreamPiece:
    prompt: int  # index of the job (prompt) in the stream
    sample: int  # index of the sample within its job
    text: str  # new text of that sample
    tokens: list[TokenInfo]  # tokens whose log-probs go with this piece
    version: int  # the adapter version decoding it
    finished: Sample | None = None  # set on the sample's last piece


class SampleText:
    """One sample's text as its tokens arrive: how much may be shown, and which tokens it has passed."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.extras: list[tuple[float | None, list[tuple[int, float]] | None]] = []
        self.shown = ""
        self.passed = 0  # tokens handed out with a piece

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> tuple[str, list]:
        self.ids.append(token)
        self.extras.append((logprob, top))
        safe = self._safe(self.tokenizer.decode(self.ids[:-1], skip_special_tokens=True))
        delta = safe[len(self.shown) :] if safe.startswith(self.shown) else ""
        self.shown += delta
        tokens = [(self.ids[k], *self.extras[k]) for k in range(self.passed, len(self.ids) - 1)]
        self.passed = max(self.passed, len(self.ids) - 1)
        return delta, tokens

    def finish(self, sample: Sample) -> tuple[str, list]:
        """The rest of the final text, and the tokens not handed out yet (with the sample's own log-probs)."""
        delta = sample.text[len(self.shown) :] if sample.text.startswith(self.shown) else ""
        self.shown += delta
        tokens = []
        for k in range(self.passed, len(sample.token_ids)):
            logprob = sample.token_logprobs[k] if sample.token_logprobs is not None else None
            top = sample.top_logprobs[k] if sample.top_logprobs else None
            tokens.append((sample.token_ids[k], logprob, top))
        self.passed = len(sample.token_ids)
        return delta, tokens

    def _safe(self, text: str) -> str:
        """`text` without what may still change: an incomplete last character, a stop string and what follows it
        (the decoder ends the sample there), a tail that could be the start of a stop string."""
        text = text.rstrip("\ufffd")
        for stop in self.stops:
            if (cut := text.find(stop)) >= 0:
                text = text[:cut]
        longest = max((len(stop) for stop in self.stops), default=0)
        for length in range(min(longest - 1, len(text)), 0, -1):
            if any(stop.startswith(text[-length:]) for stop in self.stops):
                return text[:-length]
        return text


class SampleStream:
    """`version_now()` is read on the worker thread as a token is decoded: the adapter version of the running
    batch (updates never run beside generation)."""

    def __init__(self, tokenizer: Any, jobs: list[GenerationRequest], version_now: Callable[[], int]):
        self.loop = asyncio.get_running_loop()
        self.version_now = version_now
        self.queue: asyncio.Queue[tuple] = asyncio.Queue()
        self.jobs = [replace(job, on_token=self._on_token(p)) for p, job in enumerate(jobs)]
        self.texts = {
            (p, j): SampleText(tokenizer, job.stop) for p, job in enumerate(jobs) for j in range(job.n)
        }
        self.samples: list[list[Sample]] = [[] for _ in jobs]
        self.version = -1  # the highest adapter version that produced a job

    def _on_token(self, prompt: int):
        def on_token(sample: int, token: int, logprob: float | None, top) -> None:  # the worker thread
            event = ("token", prompt, sample, token, logprob, top, self.version_now())
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

        return on_token

    async def pieces(
        self, generate: Callable[[GenerationRequest], Awaitable[tuple[list[Sample], int]]]
    ) -> AsyncIterator[StreamPiece]:
        """Every sample's pieces as they come; a job that fails raises here. Leaving early (the client went away)
        cancels the jobs still waiting for the model."""

        async def run(prompt: int, job: GenerationRequest) -> None:
            try:
                self.queue.put_nowait(("done", prompt, await generate(job)))
            except Exception as exc:
                self.queue.put_nowait(("failed", prompt, exc))

        tasks = [asyncio.ensure_future(run(p, job)) for p, job in enumerate(self.jobs)]
        try:
            remaining = len(tasks)
            while remaining:
                event, prompt, *rest = await self.queue.get()
                if event == "token":
                    sample, token, logprob, top, version = rest
                    text, tokens = self.texts[prompt, sample].add(token, logprob, top)
                    if text or tokens:
                        yield StreamPiece(prompt, sample, text, tokens, version)
                elif event == "failed":
                    raise rest[0]
                else:
                    samples, version = rest[0]
                    self.samples[prompt], self.version = samples, max(self.version, version)
                    remaining -= 1
                    for j, sample in enumerate(samples):
                        text, tokens = self.texts[prompt, j].finish(sample)
                        yield StreamPiece(prompt, j, text, tokens, version, finished=sample)
        finally:
            for task in tasks:
                task.cancel()
