"""The trainer's operations behind the routes: render and tokenise requests, send them through the batcher to the
student, and hand the results to the response shaper (openai_format.py) or the protocol's models. No HTTP here:
refusals are TrainerErrors raised with their status and field.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
    GrpoStepRequest,
    GrpoStepResponse,
    HealthResponse,
    LogprobsRequest,
    LogprobsResponse,
    ModelName,
    PromptedItem,
    SamplingRequest,
)

from . import checkpoints as ckpt
from .adapter_export import AdapterExporter
from .batching import Batch, Batcher
from .checkpoint_retention import RetentionPolicy
from .errors import InvalidRequest, TrainerError
from .items import GenerationRequest, GrpoItem, Sample, ScoreItem
from .learning import check_grpo_items
from .openai_format import ResponseShaper
from .settings import TrainerSettings
from .streaming import SampleStream
from .student import Student

GENERATE, SCORE = "generate", "logprobs"  # the batcher's merge keys, paired with use_adapter
BOTH_MODELS = "both"  # in place of use_adapter: generation jobs of student and base share one decode loop


class TrainerEngine:
    def __init__(self, student: Student, settings: TrainerSettings):
        self.student = student
        self.settings = settings
        # The worker thread decodes with student.tokenizer; handlers get their own copy (Rust tokenizers must
        # not be used from two threads at once).
        self.tokenizer = copy.deepcopy(student.tokenizer)
        self.shaper = ResponseShaper(self.tokenizer)
        self.checkpoint_dir = Path(settings.checkpoint_dir)
        self.exporter = (
            AdapterExporter(settings.adapter_export_dir, settings.adapter_export_keep)
            if settings.adapter_export_dir is not None
            else None
        )
        self.adapter_path: str | None = None  # the exported directory of the current version
        self.export_adapter()  # version 0, the fresh adapter
        self.batcher = Batcher(
            self._run_batch,
            max_batch_rows=settings.max_batch_size,
            wait_ms=settings.batch_wait_ms,
            admit_every=settings.admit_every_steps,
        )

    def close(self) -> None:
        self.batcher.close()

    def export_adapter(self) -> str | None:
        """Write the current adapter version for the student server (None when export is off). Called where
        nothing else runs on the model: at start, and inside the exclusive step or checkpoint load."""
        if self.exporter is None:
            return None
        s = self.student
        self.adapter_path = (
            None  # until this version is written: /health never names another version's adapter
        )
        self.adapter_path = str(
            self.exporter.export(s.adapter_version, s.adapter_state(), s.adapter_config())
        )
        return self.adapter_path

    # ----- the worker side: one merged batch at a time -----
    def _run_batch(self, kind: tuple[str, bool], batch: Batch) -> list[Any]:
        what, use_adapter = kind
        version = self.student.adapter_version  # constant for the batch: updates never run alongside it
        if what == GENERATE and use_adapter == BOTH_MODELS:  # payloads are (model, request)
            results = self.student.generate_models(
                batch.payloads,
                admit=batch.admit,
                on_done=lambda index, samples: batch.resolve(index, (samples, version)),
            )
        elif what == GENERATE:
            results: list[Any] = self.student.generate(
                batch.payloads,
                use_adapter=use_adapter,
                admit=batch.admit,
                on_done=lambda index, samples: batch.resolve(index, (samples, version)),
            )
        else:  # SCORE: each payload is a list of ScoreItems; score them all together, then split
            payloads = batch.payloads
            flat = [item for items in payloads for item in items]
            scores = self.student.logprobs(
                flat, use_adapter=use_adapter, batch_size=self.settings.max_batch_size
            )
            results, start = [], 0
            for items in payloads:
                results.append(scores[start : start + len(items)])
                start += len(items)
        return [(result, version) for result in results]

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
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def _check_room(self, field: str, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequest(field, "the prompt has no tokens")
        if prompt_len + max_tokens > self.student.max_context:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the context of {self.student.max_context} tokens",
            )

    # ----- generation -----
    def _submit(self, model: ModelName, request: GenerationRequest) -> Awaitable[tuple[list[Sample], int]]:
        """One request to the batcher; answers its samples and the adapter version that produced them."""
        if self.student.decodes_models_together:
            return self.batcher.call((GENERATE, BOTH_MODELS), (model, request), rows=request.n)
        return self.batcher.call((GENERATE, model == "student"), request, rows=request.n)

    async def _generate(
        self, model: ModelName, requests: list[GenerationRequest]
    ) -> tuple[list[list[Sample]], int]:
        outcomes = await asyncio.gather(*(self._submit(model, r) for r in requests))
        return [samples for samples, _ in outcomes], max(version for _, version in outcomes)

    def _stream(self, model: ModelName, jobs: list[GenerationRequest]) -> SampleStream:
        return SampleStream(self.tokenizer, jobs, version_now=lambda: self.student.adapter_version)

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
            prompt_scores, _ = await self.batcher.call(
                (SCORE, req.model == "student"), items, rows=len(items)
            )
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
        max_tokens = (
            req.max_completion_tokens or req.max_tokens or max(self.student.max_context - len(ids), 1)
        )
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
            if item.completion_ids and max(item.completion_ids) >= self.student.vocab_size:
                raise InvalidRequest(
                    f"{field}[{i}].completion_ids", f"token ids must be below {self.student.vocab_size}"
                )
            if not context_ids:
                raise InvalidRequest(f"{field}[{i}].prompt", "the prompt has no tokens")
            if len(context_ids) + len(completion_ids) > self.student.max_context:
                raise InvalidRequest(
                    f"{field}[{i}]",
                    f"{len(context_ids) + len(completion_ids)} tokens exceed the context of {self.student.max_context}",
                )
            scored.append(ScoreItem(context_ids, completion_ids))
        return scored

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResponse:
        items = self._score_items(req.items)
        scores, version = await self.batcher.call((SCORE, req.model == "student"), items, rows=len(items))
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

        def apply() -> GrpoStepResponse:
            student = self.student
            if (
                req.step_key is not None
                and req.step_key == student.last_step_key
                and student.last_step_result
            ):
                answer = {**student.last_step_result, "duplicate": True}
                if answer.get("adapter_version") == student.adapter_version and self.exporter is not None:
                    answer["adapter_path"] = self.export_adapter()  # also when the first export failed
                return GrpoStepResponse.model_validate(answer)
            result = GrpoStepResponse(**asdict(student.grpo_step(items, req.loss)), duplicate=False)
            # Remembered before the export: a retry after an export that failed is not applied twice.
            student.last_step_key, student.last_step_result = req.step_key, result.model_dump()
            result.adapter_path = self.export_adapter()
            student.last_step_result = result.model_dump()
            return result

        return await self.batcher.exclusive(apply)

    # ----- checkpoints -----
    def _checkpoint_info(self, name: str, path: Path) -> CheckpointInfo:
        s = self.student
        return CheckpointInfo(
            name=name,
            path=str(path),
            step=s.step,
            adapter_version=s.adapter_version,
            step_key=s.last_step_key,
        )

    async def save_checkpoint(self, name: str | None) -> CheckpointInfo:
        def save() -> CheckpointInfo:
            s = self.student
            chosen = name or f"step-{s.step:06d}"
            meta = {
                "step": s.step,
                "adapter_version": s.adapter_version,
                "step_key": s.last_step_key,
                "last_result": s.last_step_result,
                "model": s.name,
            }
            saved = ckpt.save_retained(
                self.checkpoint_dir, chosen, s.adapter_state(), s.optimizer.state_dict(), meta, self.retention
            )
            info = self._checkpoint_info(chosen, saved.path)
            return info.model_copy(update={"bytes": saved.bytes, "pruned": saved.pruned})

        return await self.batcher.exclusive(save)

    @property
    def retention(self) -> RetentionPolicy:
        settings = self.settings
        return RetentionPolicy(
            keep_last=settings.checkpoint_keep_last,
            max_bytes=settings.checkpoint_max_bytes or None,
            min_free_bytes=settings.checkpoint_min_free_bytes,
        )

    async def delete_checkpoint(self, name: str) -> CheckpointDeleted:
        # With nothing else running: a save's room check counts what is there.
        freed = await self.batcher.exclusive(lambda: ckpt.delete_checkpoint(self.checkpoint_dir, name))
        return CheckpointDeleted(name=name, bytes=freed)

    async def load_checkpoint(self, name: str) -> CheckpointInfo:
        # Read and verify off the worker (it may be slow); apply on it, with nothing else running.
        checkpoint = await asyncio.to_thread(ckpt.load_checkpoint, self.checkpoint_dir, name)

        def apply() -> CheckpointInfo:
            s = self.student
            meta = checkpoint.meta
            previous = s.adapter_state()
            try:
                s.load_adapter_state(
                    checkpoint.adapter
                )  # validates names and shapes before changing anything
                s.optimizer.load_state_dict(checkpoint.optimizer)
            except (ValueError, KeyError, RuntimeError) as exc:
                s.load_adapter_state(previous)
                raise ckpt.CheckpointCorrupt(f"checkpoint {name}: does not fit this model: {exc}") from exc
            s.step, s.adapter_version = int(meta.get("step", 0)), int(meta.get("adapter_version", 0))
            s.last_step_key, s.last_step_result = meta.get("step_key"), meta.get("last_result")
            self.export_adapter()  # the version the load set, under the path of these weights
            return self._checkpoint_info(name, self.checkpoint_dir / name)

        return await self.batcher.exclusive(apply)

    def list_checkpoints(self) -> CheckpointList:
        entries = ckpt.list_checkpoints(self.checkpoint_dir)
        policy = self.retention
        return CheckpointList(
            checkpoints=[CheckpointEntry(**entry) for entry in entries],
            total_bytes=ckpt.folder_bytes(self.checkpoint_dir),
            max_bytes=policy.max_bytes,
            keep_last=policy.keep_last,
        )

    def health(self, started_at: float) -> HealthResponse:
        s = self.student
        return HealthResponse(
            backend=s.backend,
            device=str(s.device),
            model=s.name,
            adapter_version=s.adapter_version,
            adapter_path=self.adapter_path,
            step=s.step,
            queue_depth=self.batcher.depth,
            batcher=BatcherStats(**asdict(self.batcher.counters), forward_passes=s.forward_passes),
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
