"""The engine core: everything that runs on the model, behind one small interface, so the request handling in
engine.py (TrainerEngine) is the same whether the model lives in this process or in another.

    core.generate(model, request) -> (samples, adapter version)     core.score(model, items) -> (scores, version)
    core.grpo_step(items, loss, step_key)   core.save/load/delete_checkpoint(name)   core.stats()
    core.facts (name, backend, device, max_context, vocab_size, ...)  core.adapter_version  core.tokenizer

Two implementations: LocalCore here (the Student and its Batcher on a worker thread of this process) and
RemoteCore (remote_core.py: a client of engine_process.py, where a LocalCore runs in a process of its own,
TRAINER_ENGINE_PROCESS). Work that must run with nothing else on the model (a GRPO step, a checkpoint) is a named
operation of the core rather than a closure, because closures cannot cross processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.protocol import CheckpointInfo, GrpoStepResponse, LossSettings, ModelName

from . import checkpoints as ckpt
from .adapter_export import AdapterExporter
from .batching import EXCLUSIVE, Batch, Batcher
from .checkpoint_retention import RetentionPolicy
from .gc_pauses import GcPauses
from .items import GenerationRequest, GrpoItem, Sample, ScoreItem
from .settings import TrainerSettings

if TYPE_CHECKING:
    from .student import Student

GENERATE, SCORE = "generate", "score"  # the batcher's merge keys (paired with use_adapter) and the core's ops
GRPO_STEP, SAVE, LOAD, DELETE, STATS = (
    "grpo_step",
    "save_checkpoint",
    "load_checkpoint",
    "delete_checkpoint",
    "stats",
)
BOTH_MODELS = "both"  # in place of use_adapter: generation jobs of student and base share one decode loop


@dataclass(frozen=True)
class CoreFacts:
    """What does not change while the core runs."""

    name: str
    backend: str
    device: str
    max_context: int
    vocab_size: int
    # the ids that end a sample (a remote core's front end detokenizes with them)
    eos_ids: tuple[int, ...] = ()
    # the weights' dtype generation decodes with ("float32", "bfloat16"): sampled log-probs come from it
    decode_dtype: str = ""


@dataclass
class EngineStats:
    """What /health reports of the core, read at one moment."""

    adapter_version: int
    adapter_path: str | None
    step: int
    queue_depth: int
    counters: dict[str, float]  # batching.BatcherCounters' fields, forward_passes and decode_counters()


class EngineCore:
    """The interface TrainerEngine talks to; subclasses implement `_call(op, payload, rows)`."""

    facts: CoreFacts
    tokenizer: Any  # the student's tokenizer (and chat template): the request side's own copy
    failure: str | None = (
        None  # why the core can serve no more (a remote core's process died); None while it can
    )

    @property
    def adapter_version(self) -> int:
        raise NotImplementedError

    async def _call(self, op: str, payload: Any, rows: int = 1) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def hops(self) -> dict[str, float] | None:
        """Where generation jobs' time went between processes (a remote core's WireTimes), or None."""
        return None

    async def generate(self, model: ModelName, request: GenerationRequest) -> tuple[list[Sample], int]:
        """The request's samples and the adapter version that produced them; request.on_token (if set) is called
        for each token as it is decoded, from a thread that is not the event loop's."""
        return await self._call(GENERATE, (model, request), rows=request.n)

    async def score(self, model: ModelName, items: list[ScoreItem]) -> tuple[list[list[float]], int]:
        return await self._call(SCORE, (model, items), rows=len(items))

    async def grpo_step(
        self, items: list[GrpoItem], loss: LossSettings, step_key: str | None
    ) -> GrpoStepResponse:
        return await self._call(GRPO_STEP, (items, loss, step_key))

    async def save_checkpoint(self, name: str | None) -> CheckpointInfo:
        return await self._call(SAVE, name)

    async def load_checkpoint(self, name: str) -> CheckpointInfo:
        return await self._call(LOAD, name)

    async def delete_checkpoint(self, name: str) -> int:
        """The bytes freed."""
        return await self._call(DELETE, name)

    async def stats(self) -> EngineStats:
        return await self._call(STATS, None)


class LocalCore(EngineCore):
    """The Student and its Batcher in this process. `submit(op, payload, rows)` answers a concurrent Future (the
    engine process calls it from its reader thread; the async methods await it). With detokenize off (the engine
    process's core), generation answers DecodedRows, which the front end turns into Samples."""

    def __init__(self, student: Student, settings: TrainerSettings, *, detokenize: bool = True):
        self.student = student
        self.settings = settings
        student.detokenize = detokenize
        self.facts = CoreFacts(
            name=student.name,
            backend=student.backend,
            device=str(student.device),
            max_context=student.max_context,
            vocab_size=student.vocab_size,
            eos_ids=tuple(student.eos_ids),
            decode_dtype=str(student.decode_dtype).removeprefix("torch."),
        )
        # The worker thread decodes with student.tokenizer; request handlers get their own copy (Rust tokenizers
        # must not be used from two threads at once).
        self.tokenizer = copy.deepcopy(student.tokenizer)
        self.checkpoint_dir = Path(settings.checkpoint_dir)
        self.exporter = (
            AdapterExporter(settings.adapter_export_dir, settings.adapter_export_keep)
            if settings.adapter_export_dir is not None
            else None
        )
        self.adapter_path: str | None = None  # the exported directory of the current version
        self.export_adapter()  # version 0, the fresh adapter
        self.gc_pauses = GcPauses()  # this process's collections, reported with the engine's counters
        self.batcher = Batcher(
            self._run_batch,
            max_batch_rows=settings.max_batch_size,
            wait_ms=settings.batch_wait_ms,
            admit_every=settings.admit_every_steps,
        )
        self._operations = {
            GENERATE: self._submit_generate,
            SCORE: self._submit_score,
            GRPO_STEP: lambda payload, rows: self.batcher.submit(
                EXCLUSIVE, lambda: self._grpo_step(*payload)
            ),
            SAVE: lambda name, rows: self.batcher.submit(EXCLUSIVE, lambda: self._save(name)),
            LOAD: lambda name, rows: self._submit_load(name),
            # With nothing else running: a save's room check counts what is there.
            DELETE: lambda name, rows: self.batcher.submit(
                EXCLUSIVE, lambda: ckpt.delete_checkpoint(self.checkpoint_dir, name)
            ),
            STATS: lambda payload, rows: _done(self.read_stats()),
        }

    @property
    def adapter_version(self) -> int:
        return self.student.adapter_version

    def close(self) -> None:
        self.batcher.close()
        self.gc_pauses.close()

    def submit(self, op: str, payload: Any, rows: int = 1) -> concurrent.futures.Future:
        return self._operations[op](payload, rows)

    async def _call(self, op: str, payload: Any, rows: int = 1) -> Any:
        return await asyncio.wrap_future(self.submit(op, payload, rows))

    def read_stats(self) -> EngineStats:
        s = self.student
        return EngineStats(
            adapter_version=s.adapter_version,
            adapter_path=self.adapter_path,
            step=s.step,
            queue_depth=self.batcher.depth,
            counters={
                **asdict(self.batcher.counters),
                "forward_passes": s.forward_passes,
                **decode_counters(s),
                "gc_collections": self.gc_pauses.collections,
                "gc_s": self.gc_pauses.seconds,
                "gc_longest_s": self.gc_pauses.longest_s,
            },
        )

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

    # ----- generation and scoring: merged batches on the worker thread -----
    def _submit_generate(
        self, payload: tuple[ModelName, GenerationRequest], rows: int
    ) -> concurrent.futures.Future:
        model, request = payload
        if self.student.decodes_models_together:
            return self.batcher.submit((GENERATE, BOTH_MODELS), payload, rows=rows)
        return self.batcher.submit((GENERATE, model == "student"), request, rows=rows)

    def _submit_score(
        self, payload: tuple[ModelName, list[ScoreItem]], rows: int
    ) -> concurrent.futures.Future:
        model, items = payload
        return self.batcher.submit((SCORE, model == "student"), items, rows=rows)

    def _run_batch(self, kind: tuple[str, Any], batch: Batch) -> list[Any]:
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

    # ----- the exclusive operations: alone on the worker thread -----
    def _grpo_step(self, items: list[GrpoItem], loss: LossSettings, step_key: str | None) -> GrpoStepResponse:
        student = self.student
        if step_key is not None and step_key == student.last_step_key and student.last_step_result:
            answer = {**student.last_step_result, "duplicate": True}
            if answer.get("adapter_version") == student.adapter_version and self.exporter is not None:
                answer["adapter_path"] = self.export_adapter()  # also when the first export failed
            return GrpoStepResponse.model_validate(answer)
        result = GrpoStepResponse(**asdict(student.grpo_step(items, loss)), duplicate=False)
        # Remembered before the export: a retry after an export that failed is not applied twice.
        student.last_step_key, student.last_step_result = step_key, result.model_dump()
        result.adapter_path = self.export_adapter()
        student.last_step_result = result.model_dump()
        return result

    def _checkpoint_info(self, name: str, path: Path) -> CheckpointInfo:
        s = self.student
        return CheckpointInfo(
            name=name,
            path=str(path),
            step=s.step,
            adapter_version=s.adapter_version,
            step_key=s.last_step_key,
        )

    @property
    def retention(self) -> RetentionPolicy:
        return retention_policy(self.settings)

    def _save(self, name: str | None) -> CheckpointInfo:
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

    def _submit_load(self, name: str) -> concurrent.futures.Future:
        """Read and verify off the worker (it may be slow); apply on it, with nothing else running."""
        answer: concurrent.futures.Future = concurrent.futures.Future()

        def read() -> None:
            try:
                checkpoint = ckpt.load_checkpoint(self.checkpoint_dir, name)
            except BaseException as exc:
                answer.set_exception(exc)
                return
            applied = self.batcher.submit(EXCLUSIVE, lambda: self._apply_checkpoint(name, checkpoint))
            applied.add_done_callback(lambda done: _copy_outcome(done, answer))

        threading.Thread(target=read, name="trainer-checkpoint-read", daemon=True).start()
        return answer

    def _apply_checkpoint(self, name: str, checkpoint: ckpt.Checkpoint) -> CheckpointInfo:
        s = self.student
        meta = checkpoint.meta
        previous = s.adapter_state()
        try:
            s.load_adapter_state(checkpoint.adapter)  # validates names and shapes before changing anything
            s.optimizer.load_state_dict(checkpoint.optimizer)
        except (ValueError, KeyError, RuntimeError) as exc:
            s.load_adapter_state(previous)
            raise ckpt.CheckpointCorrupt(f"checkpoint {name}: does not fit this model: {exc}") from exc
        s.step, s.adapter_version = int(meta.get("step", 0)), int(meta.get("adapter_version", 0))
        s.last_step_key, s.last_step_result = meta.get("step_key"), meta.get("last_result")
        self.export_adapter()  # the version the load set, under the path of these weights
        return self._checkpoint_info(name, self.checkpoint_dir / name)


def retention_policy(settings: TrainerSettings) -> RetentionPolicy:
    return RetentionPolicy(
        keep_last=settings.checkpoint_keep_last,
        max_bytes=settings.checkpoint_max_bytes or None,
        min_free_bytes=settings.checkpoint_min_free_bytes,
    )


def _done(result: Any) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(result)
    return future


def _copy_outcome(source: concurrent.futures.Future, target: concurrent.futures.Future) -> None:
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def decode_counters(student: Student) -> dict[str, float]:
    """The slot engine's prefill passes, decode steps, decoded rows, rows' wait for a slot, and where its loop
    waited: the host for the device (read_wait_s) or the device for the host (idle_launches; CUDA only). Zeros
    where generation runs elsewhere."""
    engine = student.slot_decoder.engine if student.slot_decoder is not None else None
    if engine is None:
        return {
            "prefill_passes": 0,
            "decode_steps": 0,
            "decoded_rows": 0,
            "place_wait_s": 0.0,
            "read_wait_s": 0.0,
            "idle_launches": 0,
        }
    return {
        "prefill_passes": engine.prefill_passes,
        "decode_steps": engine.decode_steps,
        "decoded_rows": engine.decoded_rows,
        "place_wait_s": engine.place_wait_seconds,
        "read_wait_s": engine.read_wait_seconds,
        "idle_launches": engine.idle_launches,
    }
