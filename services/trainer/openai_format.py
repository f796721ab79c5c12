"""OpenAI response shaping: the student's samples (token ids, log-probs) as completion and chat objects, with
their log-probs in each API's format and the usage counts, whole or (stream: true) as chunks while a SampleStream
brings the samples' pieces. Nothing here runs the model."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from services.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionResponse,
    ModelName,
    TopLogprob,
    Usage,
)

from .items import GenerationRequest, Sample
from .streaming import SampleStream, StreamPiece, TokenInfo


class ResponseShaper:
    """Turns samples into OpenAI objects with the tokenizer of the request handlers (not the worker's)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        # A token's text alone never changes, and log-probs name every token of every sample: decoded once per
        # id (at most the vocabulary), not once per occurrence. tokenizer.decode costs ~20 us in transformers'
        # Python, 128 times per answer: ~10% of the process's GIL time at 255 requests in flight before this.
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        """The token's text alone, as OpenAI's log-probs name it (special tokens kept)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return piece

    def completion(
        self,
        model: ModelName,
        prompts: list[str],
        jobs: list[GenerationRequest],
        per_prompt: list[list[Sample]],
        *,
        n: int,
        echo: bool,
        logprobs: bool,
        prompt_scores: list[list[float]] | None,
        adapter_version: int,
    ) -> CompletionResponse:
        """prompt_scores: with echo and logprobs, each prompt's token log-probs after its first token."""
        choices = []
        for p, (prompt, job, samples) in enumerate(zip(prompts, jobs, per_prompt, strict=True)):
            for j, sample in enumerate(samples):
                shaped = None
                if logprobs:
                    echoed = (prompt, prompt_scores[p]) if echo and prompt_scores is not None else None
                    shaped = self.completion_logprobs(sample, job, echoed)
                choices.append(
                    CompletionChoice(
                        index=p * n + j,
                        text=(prompt + sample.text) if echo else sample.text,
                        finish_reason=sample.finish_reason,  # type: ignore[arg-type]
                        stop_reason=sample.stop_reason,
                        logprobs=shaped,
                    )
                )
        return CompletionResponse(
            id=_response_id("cmpl"),
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage(jobs, per_prompt),
            adapter_version=adapter_version,
        )

    def completion_logprobs(
        self, sample: Sample, job: GenerationRequest, echoed: tuple[str, list[float]] | None
    ) -> CompletionLogprobs:
        """Legacy completions' log-probs; `echoed` = (prompt, its scores) puts the prompt's tokens first."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = 0
        if echoed is not None:
            prompt, prompt_scores = echoed
            for k, token_id in enumerate(job.prompt_ids):
                piece = self.piece(token_id)
                tokens.append(piece)
                token_logprobs.append(None if k == 0 else prompt_scores[k - 1])
                top.append(None)
                offsets.append(offset)
                offset += len(piece)
            offset = len(prompt)
        for k, token_id in enumerate(sample.token_ids):
            piece = self.piece(token_id)
            tokens.append(piece)
            token_logprobs.append(sample.token_logprobs[k] if sample.token_logprobs is not None else None)
            top.append({self.piece(t): v for t, v in sample.top_logprobs[k]} if sample.top_logprobs else None)
            offsets.append(offset)
            offset += len(piece)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets
        )

    def chat(
        self,
        model: ModelName,
        job: GenerationRequest,
        samples: list[Sample],
        *,
        logprobs: bool,
        adapter_version: int,
    ) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=j,
                message=AssistantMessage(content=sample.text),
                finish_reason=sample.finish_reason,  # type: ignore[arg-type]
                stop_reason=sample.stop_reason,
                logprobs=self.chat_logprobs(sample) if logprobs else None,
            )
            for j, sample in enumerate(samples)
        ]
        return ChatCompletionResponse(
            id=_response_id("chatcmpl"),
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage([job], [samples]),
            adapter_version=adapter_version,
        )

    def chat_logprobs(self, sample: Sample) -> ChatLogprobs:
        return self.chat_token_logprobs(_tokens(sample))

    def chat_token_logprobs(self, tokens: list[TokenInfo]) -> ChatLogprobs:
        content = []
        for token_id, logprob, top in tokens:
            piece = self.piece(token_id)
            alternatives = [
                TopLogprob(token=self.piece(t), logprob=v, bytes=list(self.piece(t).encode()))
                for t, v in (top or [])
            ]
            content.append(
                ChatTokenLogprob(
                    token=piece,
                    logprob=logprob if logprob is not None else 0.0,
                    bytes=list(piece.encode()),
                    top_logprobs=alternatives,
                )
            )
        return ChatLogprobs(content=content)

    # ----- stream: true -----
    async def chat_chunks(
        self,
        model: ModelName,
        stream: SampleStream,
        pieces: AsyncIterator[StreamPiece],
        *,
        logprobs: bool,
        include_usage: bool,
    ) -> AsyncIterator[ChatCompletionChunk]:
        """OpenAI's chat chunks: per choice a first one with the role, then the text as it comes (with its tokens'
        log-probs when asked), the last with finish_reason; with include_usage a last chunk with no choices."""
        chunk_id, created = _response_id("chatcmpl"), int(time.time())
        started: set[int] = set()
        version = 0
        async for piece in pieces:
            version = piece.version
            choices = []
            if piece.sample not in started:
                started.add(piece.sample)
                choices.append(
                    ChatChunkChoice(index=piece.sample, delta=ChatDelta(role="assistant", content=""))
                )
            done = piece.finished
            choices.append(
                ChatChunkChoice(
                    index=piece.sample,
                    delta=ChatDelta(content=piece.text),
                    logprobs=self.chat_token_logprobs(piece.tokens) if logprobs else None,
                    finish_reason=done.finish_reason if done else None,  # type: ignore[arg-type]
                    stop_reason=done.stop_reason if done else None,
                )
            )
            for choice in choices:
                yield ChatCompletionChunk(
                    id=chunk_id, created=created, model=model, choices=[choice], adapter_version=version
                )
        if include_usage:
            yield _usage_chunk(ChatCompletionChunk, chunk_id, created, model, stream, version)

    async def completion_chunks(
        self,
        model: ModelName,
        prompts: list[str],
        stream: SampleStream,
        pieces: AsyncIterator[StreamPiece],
        *,
        n: int,
        echo: bool,
        include_usage: bool,
    ) -> AsyncIterator[CompletionChunk]:
        """Legacy completion chunks: per choice (prompt index x n + sample index) the text as it comes (the prompt
        first with echo), its tokens' log-probs when asked (text_offset counted within the choice's text), the
        last with finish_reason; with include_usage a last chunk with no choices."""
        chunk_id, created = _response_id("cmpl"), int(time.time())
        offsets: dict[
            int, int
        ] = {}  # per choice: where its next token's text starts (as whole answers count)
        version = 0
        async for piece in pieces:
            version = piece.version
            index = piece.prompt * n + piece.sample
            text = piece.text
            if index not in offsets:
                offsets[index] = 0
                if echo:
                    text = prompts[piece.prompt] + text
            job = stream.jobs[piece.prompt]
            shaped = None
            if job.logprobs is not None:
                shaped, offsets[index] = self.completion_token_logprobs(piece.tokens, offsets[index])
            done = piece.finished
            choice = CompletionChunkChoice(
                index=index,
                text=text,
                logprobs=shaped,
                finish_reason=done.finish_reason if done else None,  # type: ignore[arg-type]
                stop_reason=done.stop_reason if done else None,
            )
            yield CompletionChunk(
                id=chunk_id, created=created, model=model, choices=[choice], adapter_version=version
            )
        if include_usage:
            yield _usage_chunk(CompletionChunk, chunk_id, created, model, stream, version)

    def completion_token_logprobs(
        self, tokens: list[TokenInfo], offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """The tokens' legacy log-probs, the first token's text starting at `offset`; and the offset after them."""
        shaped = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, logprob, top in tokens:
            piece = self.piece(token_id)
            shaped.tokens.append(piece)
            shaped.token_logprobs.append(logprob)
            shaped.top_logprobs.append({self.piece(t): v for t, v in top} if top else None)
            shaped.text_offset.append(offset)
            offset += len(piece)
        return shaped, offset


def _tokens(sample: Sample) -> list[TokenInfo]:
    return [
        (
            token_id,
            sample.token_logprobs[k] if sample.token_logprobs is not None else None,
            sample.top_logprobs[k] if sample.top_logprobs else None,
        )
        for k, token_id in enumerate(sample.token_ids)
    ]


def usage(jobs: list[GenerationRequest], per_prompt: list[list[Sample]]) -> Usage:
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
    completion_tokens = sum(s.num_generated for samples in per_prompt for s in samples)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


_Chunk = TypeVar("_Chunk", ChatCompletionChunk, CompletionChunk)


def _usage_chunk(
    chunk: type[_Chunk], chunk_id: str, created: int, model: ModelName, stream: SampleStream, version: int
) -> _Chunk:
    """The last chunk of a stream asked with stream_options.include_usage: no choices, the whole request's usage."""
    return chunk(
        id=chunk_id,
        created=created,
        model=model,
        choices=[],
        usage=usage(stream.jobs, stream.samples),
        adapter_version=version,
    )
