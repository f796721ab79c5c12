"""The trainer's operations behind the routes: render and tokenise requests, send them to the engine core (core.py:
the student behind its batcher, in this process or in the engine process), and hand the results to the response
shaper (openai_format.py) or the protocol's models. No HTTP here: refusals are TrainerErrors raised with their
status and field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from jinja2 import TemplateError

from services.protocol import (
    BatcherStats,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CheckpointDeleted,
    CheckpointEntry,
    CheckpointInfo,
    CheckpointList,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionScore,
    EngineHops,
    GrpoStepRequest,
    GrpoStepResponse,
    HealthResponse,
    LogprobsRequest,
    LogprobsResponse,
    ModelName,
    PromptedItem,
    SamplingRequest,
    ServiceStats,
)

from . import checkpoints as ckpt
from .core import EngineCore, retention_policy
from .errors import InvalidRequest, TrainerError
from .gc_pauses import GcPauses
from .items import GenerationRequest, GrpoItem, Sample, ScoreItem, check_grpo_items
from .openai_format import ResponseShaper
from .settings import TrainerSettings
from .streaming import SampleStream


class TrainerEngine:
    """The request side of the trainer over an engine core (core.py): in this process (LocalCore) or in the
    engine process (RemoteCore, TRAINER_ENGINE_PROCESS); every line of request handling is the same for both."""

    def __init__(self, core: EngineCore, settings: TrainerSettings):
        self.core = core
        self.settings = settings
        self.facts = core.facts
        self.tokenizer = core.tokenizer
        self.shaper = ResponseShaper(self.tokenizer)
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)  # the Rust tokenizer of a fast one
        self.checkpoint_dir = Path(settings.checkpoint_dir)
        self.generations = 0  # generation jobs handed to the core, and their wall time until answered
        self.generation_seconds = 0.0

    def close(self) -> None:
        self.core.close()

    # ----- tokenising -----
    def render(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            if continue_final_message:
                head = self.tokenizer.apply_chat_template(
                    plain[:-1], tokenize=False, add_generation_prompt=True
                )
                return head + plain[-1]["content"]
            return self.tokenizer.apply_chat_template(
                plain, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as exc:
            # The model's chat template rejects these messages (e.g. roles that do not alternate, for some models).
            raise TrainerError(
                f"the chat template refused the messages: {exc}", field="messages", status=400
            ) from exc

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        # A fast tokenizer's own encoder gives the same ids as transformers' __call__ without its Python around
        # it (~14% of the HTTP process's time at 255 requests in flight, on the H200).
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=special).ids
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def _check_room(self, field: str, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequest(field, "the prompt has no tokens")
        if prompt_len + max_tokens > self.facts.max_context:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the context of {self.facts.max_context} tokens",
            )

    # ----- generation -----
    async def _submit(self, model: ModelName, request: GenerationRequest) -> tuple[list[Sample], int]:
        """One request to the core; answers its samples and the adapter version that produced them."""
        started = time.perf_counter()
        try:
            return await self.core.generate(model, request)
        finally:
            self.generations += 1
            self.generation_seconds += time.perf_counter() - started

    async def _generate(
        self, model: ModelName, requests: list[GenerationRequest]
    ) -> tuple[list[list[Sample]], int]:
        outcomes = await asyncio.gather(*(self._submit(model, r) for r in requests))
        return [samples for samples, _ in outcomes], max(version for _, version in outcomes)

    def _stream(self, model: ModelName, jobs: list[GenerationRequest]) -> SampleStream:
        return SampleStream(self.tokenizer, jobs, version_now=lambda: self.core.adapter_version)

    def _completion_jobs(self, req: CompletionRequest) -> list[GenerationRequest]:
        prompts = req.prompts
        max_tokens = req.max_tokens or 16
        jobs = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt, special=True)
            self._check_room("prompt" if len(prompts) == 1 else f"prompt[{i}]", len(ids), max_tokens)
            jobs.append(_generation_request(req, ids, max_tokens, req.logprobs))
        return jobs

    def stream_complete(self, req: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """The completion's chunks as its tokens are decoded; a refusal raises here, before anything is sent."""
        if req.echo and req.logprobs is not None:
            raise InvalidRequest("echo", "with stream, echo cannot be combined with logprobs", status=422)
        stream = self._stream(req.model, self._completion_jobs(req))
        pieces = stream.pieces(lambda job: self._submit(req.model, job))
        return self.shaper.completion_chunks(
            req.model, req.prompts, stream, pieces, n=req.n, echo=req.echo, include_usage=req.include_usage
        )

    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        prompts = req.prompts
        jobs = self._completion_jobs(req)
        per_prompt, version = await self._generate(req.model, jobs)
        prompt_scores = None
        if req.echo and req.logprobs is not None:
            items = [ScoreItem(job.prompt_ids[:1], job.prompt_ids[1:]) for job in jobs]
            prompt_scores, _ = await self.core.score(req.model, items)
        return self.shaper.completion(
            req.model,
            prompts,
            jobs,
            per_prompt,
            n=req.n,
            echo=req.echo,
            logprobs=req.logprobs is not None,
            prompt_scores=prompt_scores,
            adapter_version=version,
        )

    def _chat_job(self, req: ChatCompletionRequest) -> GenerationRequest:
        text = self.render(
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
        ids = self.encode(text)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(self.facts.max_context - len(ids), 1)
        self._check_room("messages", len(ids), max_tokens)
        top = req.top_logprobs or 0
        return _generation_request(req, ids, max_tokens, top if req.logprobs else None)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        job = self._chat_job(req)
        (samples,), version = await self._generate(req.model, [job])
        return self.shaper.chat(req.model, job, samples, logprobs=req.logprobs, adapter_version=version)

    def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """The chat completion's chunks as its tokens are decoded; a refusal raises here, before anything is
        sent."""
        stream = self._stream(req.model, [self._chat_job(req)])
        pieces = stream.pieces(lambda job: self._submit(req.model, job))
        return self.shaper.chat_chunks(
            req.model, stream, pieces, logprobs=req.logprobs, include_usage=req.include_usage
        )

    # ----- scoring and learning -----
    def _score_items(self, items: Sequence[PromptedItem], field: str = "items") -> list[ScoreItem]:
        scored = []
        for i, item in enumerate(items):
            prompt = self.render(item.messages) if item.messages is not None else (item.prompt or "")
            context_ids = self.encode(prompt + item.context)
            completion_ids = item.completion_ids or self.encode(item.completion)
            if item.completion_ids and max(item.completion_ids) >= self.facts.vocab_size:
                raise InvalidRequest(
                    f"{field}[{i}].completion_ids", f"token ids must be below {self.facts.vocab_size}"
                )
            if not context_ids:
                raise InvalidRequest(f"{field}[{i}].prompt", "the prompt has no tokens")
            if len(context_ids) + len(completion_ids) > self.facts.max_context:
                raise InvalidRequest(
                    f"{field}[{i}]",
                    f"{len(context_ids) + len(completion_ids)} tokens exceed the context of {self.facts.max_context}",
                )
            scored.append(ScoreItem(context_ids, completion_ids))
        return scored

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResponse:
        items = self._score_items(req.items)
        scores, version = await self.core.score(req.model, items)
        results = [
            CompletionScore(
                tokens=[self.shaper.piece(t) for t in item.completion_ids],
                token_logprobs=values,
                sum=float(sum(values)),
                mean=float(sum(values) / len(values)) if values else 0.0,
                num_tokens=len(values),
            )
            for item, values in zip(items, scores, strict=True)
        ]
        return LogprobsResponse(adapter_version=version, results=results)

    async def grpo_step(self, req: GrpoStepRequest) -> GrpoStepResponse:
        scored = self._score_items(req.items)
        # One group per prompt (its messages or string, not the context): a step of several updates keeps a
        # prompt's answers in one mini-batch where it can.
        groups: dict[str, int] = {}
        items = [
            GrpoItem(
                s.context_ids,
                s.completion_ids,
                advantage=it.advantage,
                old_logprobs=it.old_logprobs,
                weight=it.weight,
                sampler_logprobs=it.sampler_logprobs,
                group=groups.setdefault(it.model_dump_json(include={"prompt", "messages"}), len(groups)),
            )
            for s, it in zip(scored, req.items, strict=True)
        ]
        check_grpo_items(items)  # before the step is queued: a refusal costs no wait behind other work

        return await self.core.grpo_step(items, req.loss, req.step_key)

    # ----- checkpoints: saved, loaded and deleted by the core, with nothing else running on the model -----
    async def save_checkpoint(self, name: str | None) -> CheckpointInfo:
        return await self.core.save_checkpoint(name)

    async def delete_checkpoint(self, name: str) -> CheckpointDeleted:
        return CheckpointDeleted(name=name, bytes=await self.core.delete_checkpoint(name))

    async def load_checkpoint(self, name: str) -> CheckpointInfo:
        return await self.core.load_checkpoint(name)

    def list_checkpoints(self) -> CheckpointList:
        entries = ckpt.list_checkpoints(self.checkpoint_dir)
        policy = retention_policy(self.settings)
        return CheckpointList(
            checkpoints=[CheckpointEntry(**entry) for entry in entries],
            total_bytes=ckpt.folder_bytes(self.checkpoint_dir),
            max_bytes=policy.max_bytes,
            keep_last=policy.keep_last,
        )

    async def health(
        self,
        started_at: float,
        http_requests: int = 0,
        http_seconds: float = 0.0,
        *,
        gc_pauses: GcPauses,
    ) -> HealthResponse:
        """http_requests, http_seconds: what the HTTP layer answered and how long it took (its own counters);
        gc_pauses: this process's garbage collections."""
        stats = await self.core.stats()
        facts = self.facts
        return HealthResponse(
            backend=facts.backend,
            device=facts.device,
            model=facts.name,
            decode_dtype=facts.decode_dtype,
            adapter_version=stats.adapter_version,
            adapter_path=stats.adapter_path,
            step=stats.step,
            queue_depth=stats.queue_depth,
            batcher=BatcherStats.model_validate(stats.counters),
            service=ServiceStats(
                requests=http_requests,
                request_seconds=http_seconds,
                generations=self.generations,
                generation_seconds=self.generation_seconds,
                gc_collections=gc_pauses.collections,
                gc_s=gc_pauses.seconds,
                gc_longest_s=gc_pauses.longest_s,
                engine_hops=EngineHops.model_validate(hops)
                if (hops := self.core.hops()) is not None
                else None,
            ),
            started_at=started_at,
        )


def _generation_request(
    req: SamplingRequest, prompt_ids: list[int], max_tokens: int, logprobs: int | None
) -> GenerationRequest:
    """The engine's job for one prompt of a completion or chat request (their shared sampling fields)."""
    return GenerationRequest(
        prompt_ids,
        n=req.n,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop_strings,
        logprobs=logprobs,
    )
