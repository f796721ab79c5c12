"""The service behind the routes: renders and tokenises requests, sends them through the batcher to the
student, and shapes the results. No HTTP here; `RequestError(field, message)` becomes a 400 in app.py.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import checkpoints as ckpt
from .batching import Batch, Batcher
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, GrpoStepRequest, LogprobsRequest
from .settings import TrainerSettings
from .student import GenerationRequest, GrpoItem, LossConfig, ScoreItem, Student, _check_grpo_items


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


class TrainerEngine:
    def __init__(self, student: Student, settings: TrainerSettings):
        self.student = student
        self.settings = settings
        # The worker thread decodes with student.tokenizer; handlers get their own copy (Rust tokenizers must
        # not be used from two threads at once).
        self.tokenizer = copy.deepcopy(student.tokenizer)
        self.checkpoint_dir = Path(settings.checkpoint_dir)
        self.batcher = Batcher(
            self._run_batch,
            max_batch_rows=settings.max_batch_size,
            wait_ms=settings.batch_wait_ms,
            admit_every=settings.admit_every_steps,
        )

    def close(self) -> None:
        self.batcher.close()

    # ----- the worker side: one merged batch at a time -----
    def _run_batch(self, kind: tuple[str, bool], batch: Batch) -> list[Any]:
        what, use_adapter = kind
        version = self.student.adapter_version  # constant for the batch: updates never run alongside it
        if what == "generate":
            results = self.student.generate(
                batch.payloads,
                use_adapter=use_adapter,
                admit=batch.admit,
                on_done=lambda index, samples: batch.resolve(index, (samples, version)),
            )
        else:  # "logprobs": each payload is a list of ScoreItems; score them all together, then split
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
        if continue_final_message:
            head = self.tokenizer.apply_chat_template(plain[:-1], tokenize=False, add_generation_prompt=True)
            return head + plain[-1]["content"]
        return self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def _check_room(self, field: str, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise RequestError(field, "the prompt has no tokens")
        if prompt_len + max_tokens > self.student.max_context:
            raise RequestError(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the context of {self.student.max_context} tokens",
            )

    # ----- generation -----
    async def _generate(self, model: str, requests: list[GenerationRequest]) -> tuple[list, int]:
        kind = ("generate", model == "student")
        outcomes = await asyncio.gather(*(self.batcher.call(kind, r, rows=r.n) for r in requests))
        return [samples for samples, _ in outcomes], max(version for _, version in outcomes)

    async def complete(self, req: CompletionRequest) -> dict[str, Any]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        max_tokens = req.max_tokens or 16
        jobs = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt, special=True)
            self._check_room("prompt" if len(prompts) == 1 else f"prompt[{i}]", len(ids), max_tokens)
            jobs.append(_generation_request(req, ids, max_tokens, req.logprobs))
        per_prompt, version = await self._generate(req.model, jobs)
        prompt_scores = [None] * len(jobs)
        if req.echo and req.logprobs is not None:
            items = [ScoreItem(job.prompt_ids[:1], job.prompt_ids[1:]) for job in jobs]
            prompt_scores, _ = await self.batcher.call(
                ("logprobs", req.model == "student"), items, rows=len(items)
            )
        choices = []
        for p, (prompt, job, samples) in enumerate(zip(prompts, jobs, per_prompt)):
            for j, sample in enumerate(samples):
                text = (prompt + sample.text) if req.echo else sample.text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(
                        sample, job, prompt if req.echo else None, prompt_scores[p] if req.echo else None
                    )
                choices.append(
                    {
                        "index": p * req.n + j,
                        "text": text,
                        "finish_reason": sample.finish_reason,
                        "stop_reason": sample.stop_reason,
                        "logprobs": logprobs,
                    }
                )
        return _envelope("cmpl", "text_completion", req.model, choices, _usage(jobs, per_prompt), version)

    def _completion_logprobs(self, sample, job, echo_prompt: str | None, prompt_scores) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = 0
        if echo_prompt is not None:
            for k, token_id in enumerate(job.prompt_ids):
                piece = self.tokenizer.decode([token_id])
                tokens.append(piece)
                token_logprobs.append(None if k == 0 else prompt_scores[k - 1])
                top.append(None)
                offsets.append(offset)
                offset += len(piece)
            offset = len(echo_prompt)
        for k, token_id in enumerate(sample.token_ids):
            piece = self.tokenizer.decode([token_id])
            tokens.append(piece)
            token_logprobs.append(sample.token_logprobs[k])
            top.append(
                {self.tokenizer.decode([t]): v for t, v in sample.top_logprobs[k]}
                if sample.top_logprobs
                else None
            )
            offsets.append(offset)
            offset += len(piece)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
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
        job = _generation_request(req, ids, max_tokens, top if req.logprobs else None)
        (samples,), version = await self._generate(req.model, [job])
        choices = []
        for j, sample in enumerate(samples):
            logprobs = None
            if req.logprobs:
                content = []
                for k, token_id in enumerate(sample.token_ids):
                    piece = self.tokenizer.decode([token_id])
                    alternatives = [
                        {
                            "token": self.tokenizer.decode([t]),
                            "logprob": v,
                            "bytes": list(self.tokenizer.decode([t]).encode()),
                        }
                        for t, v in (sample.top_logprobs[k] if sample.top_logprobs else [])
                    ]
                    content.append(
                        {
                            "token": piece,
                            "logprob": sample.token_logprobs[k],
                            "bytes": list(piece.encode()),
                            "top_logprobs": alternatives,
                        }
                    )
                logprobs = {"content": content}
            choices.append(
                {
                    "index": j,
                    "message": {"role": "assistant", "content": sample.text},
                    "finish_reason": sample.finish_reason,
                    "stop_reason": sample.stop_reason,
                    "logprobs": logprobs,
                }
            )
        return _envelope("chatcmpl", "chat.completion", req.model, choices, _usage([job], [samples]), version)

    # ----- scoring and learning -----
    def _score_items(self, items, field: str = "items") -> list[ScoreItem]:
        scored = []
        for i, item in enumerate(items):
            prompt = self.render(item.messages) if item.messages is not None else item.prompt
            context_ids = self.encode(prompt + item.context)
            completion_ids = self.encode(item.completion)
            if not context_ids:
                raise RequestError(f"{field}[{i}].prompt", "the prompt has no tokens")
            if len(context_ids) + len(completion_ids) > self.student.max_context:
                raise RequestError(
                    f"{field}[{i}]",
                    f"{len(context_ids) + len(completion_ids)} tokens exceed the "
                    f"context of {self.student.max_context}",
                )
            scored.append(ScoreItem(context_ids, completion_ids))
        return scored

    async def logprobs(self, req: LogprobsRequest) -> dict[str, Any]:
        items = self._score_items(req.items)
        scores, version = await self.batcher.call(
            ("logprobs", req.model == "student"), items, rows=len(items)
        )
        results = []
        for item, values in zip(items, scores):
            results.append(
                {
                    "tokens": [self.tokenizer.decode([t]) for t in item.completion_ids],
                    "token_logprobs": values,
                    "sum": float(sum(values)),
                    "mean": float(sum(values) / len(values)) if values else 0.0,
                    "num_tokens": len(values),
                }
            )
        return {"adapter_version": version, "results": results}

    async def grpo_step(self, req: GrpoStepRequest) -> dict[str, Any]:
        scored = self._score_items(req.items)
        items = [
            GrpoItem(
                s.context_ids,
                s.completion_ids,
                advantage=it.advantage,
                old_logprobs=it.old_logprobs,
                weight=it.weight,
            )
            for s, it in zip(scored, req.items)
        ]
        loss = LossConfig(**req.loss.model_dump())
        try:
            _check_grpo_items(items, loss)
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            raise RequestError(field, message) from exc

        def apply() -> dict[str, Any]:
            student = self.student
            if (
                req.step_key is not None
                and req.step_key == student.last_step_key
                and student.last_step_result
            ):
                return {**student.last_step_result, "duplicate": True}
            result = {**asdict(student.grpo_step(items, loss)), "duplicate": False}
            student.last_step_key, student.last_step_result = req.step_key, result
            return result

        return await self.batcher.exclusive(apply)

    # ----- checkpoints -----
    async def save_checkpoint(self, name: str | None) -> dict[str, Any]:
        def save() -> dict[str, Any]:
            s = self.student
            chosen = name or f"step-{s.step:06d}"
            meta = {
                "step": s.step,
                "adapter_version": s.adapter_version,
                "step_key": s.last_step_key,
                "last_result": s.last_step_result,
                "model": s.name,
            }
            path = ckpt.save_checkpoint(
                self.checkpoint_dir, chosen, s.adapter_state(), s.optimizer.state_dict(), meta
            )
            return {
                "name": chosen,
                "path": str(path),
                "step": s.step,
                "adapter_version": s.adapter_version,
                "step_key": s.last_step_key,
            }

        return await self.batcher.exclusive(save)

    async def load_checkpoint(self, name: str) -> dict[str, Any]:
        # Read and verify off the worker (it may be slow); apply on it, with nothing else running.
        checkpoint = await asyncio.to_thread(ckpt.load_checkpoint, self.checkpoint_dir, name)

        def apply() -> dict[str, Any]:
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
            return {
                "name": name,
                "path": str(self.checkpoint_dir / name),
                "step": s.step,
                "adapter_version": s.adapter_version,
                "step_key": s.last_step_key,
            }

        return await self.batcher.exclusive(apply)

    def list_checkpoints(self) -> dict[str, Any]:
        return {"checkpoints": ckpt.list_checkpoints(self.checkpoint_dir)}

    def health(self) -> dict[str, Any]:
        s = self.student
        counters = asdict(self.batcher.counters)
        counters["forward_passes"] = s.forward_passes
        return {
            "status": "ok",
            "backend": s.backend,
            "device": str(s.device),
            "model": s.name,
            "adapter_version": s.adapter_version,
            "step": s.step,
            "queue_depth": self.batcher.depth,
            "batcher": counters,
        }


def _usage(jobs: list[GenerationRequest], per_prompt: list[list]) -> dict[str, int]:
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
    completion_tokens = sum(s.num_generated for samples in per_prompt for s in samples)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _generation_request(req, prompt_ids: list[int], max_tokens: int, logprobs: int | None) -> GenerationRequest:
    """The engine's job for one prompt of a completion or chat request (their shared sampling fields)."""
    return GenerationRequest(
        prompt_ids,
        n=req.n,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=list(req.stop),
        logprobs=logprobs,
    )


def _envelope(
    id_prefix: str, kind: str, model: str, choices: list[dict], usage: dict[str, int], adapter_version: int
) -> dict[str, Any]:
    """The OpenAI response object around the choices, plus the adapter version that produced them."""
    return {
        "id": f"{id_prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "adapter_version": adapter_version,
    }
