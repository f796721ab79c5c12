"""Generation through the slot decode engine (decode/): the same seam as generation.py's DecodeLoop, for a Student.

The engine decodes the plain models with the adapter merged in (decode_weights.py): lane "student" is the merged
student, synced to the adapter version first, lane "base" the base model. Where the adapter cannot be merged
(4-bit bitsandbytes, Unsloth) the Student keeps using the DecodeLoop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .decode import DecodeConfig, DecodeEngine
from .generation import Admit, OnDone
from .items import DecodedRow, Finished, GenerationRequest

if TYPE_CHECKING:
    from .settings import TrainerSettings
    from .student import Student

log = logging.getLogger(__name__)


class SlotGeneration:
    def __init__(self, student: Student, config: DecodeConfig):
        self.student = student
        self.engine = DecodeEngine(
            self.model_for, student.tokenizer, eos_ids=student.eos_ids, device=student.device, config=config
        )

    @classmethod
    def for_student(cls, student: Student, settings: TrainerSettings) -> SlotGeneration | None:
        """The engine for this student, or None where it does not apply (or TRAINER_DECODE_ENGINE=loop)."""
        if student.merged_decoder is None or settings.decode_engine != "slots":
            return None
        reason = DecodeEngine.unsupported(student.merged_decoder.base)
        if reason is not None:
            log.info("generation runs in the DecodeLoop: the slot engine does not handle %s", reason)
            return None
        chosen = {}
        if settings.decode_concurrent_prefill is not None:
            chosen["concurrent_prefill"] = settings.decode_concurrent_prefill
        config = DecodeConfig.for_device(
            student.device,
            slots=settings.max_batch_size,
            cuda_graphs=settings.cuda_graphs,
            compile=settings.decode_compile,
            seed=settings.seed,
            **chosen,
        )
        return cls(student, config)

    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        use_adapter: bool = True,
        admit: Admit | None = None,
        on_done: OnDone | None = None,
    ) -> list[list[Finished]]:
        lane = "student" if use_adapter else "base"
        return self.generate_lanes(
            [(lane, request) for request in requests],
            admit=None if admit is None else (lambda free: [(lane, r) for r in admit(free)]),
            on_done=on_done,
        )

    def generate_lanes(
        self,
        jobs: list[tuple[str, GenerationRequest]],
        *,
        admit=None,
        on_done: OnDone | None = None,
    ) -> list[list[Finished]]:
        """Requests of both lanes ("student", "base") in one decode loop."""
        before = self.engine.forward_passes
        try:
            return self.engine.generate(
                jobs,
                finish=lambda request, *row: self.student.finish_row(request, DecodedRow(*row)),
                admit=admit,
                on_done=on_done,
            )
        finally:
            self.student.forward_passes += self.engine.forward_passes - before

    def model_for(self, lane: str) -> tuple[Any, Any]:
        """The model a lane decodes with, and an epoch that changes whenever that model's weights change."""
        merged = self.student.merged_decoder
        if merged is None:
            raise RuntimeError("the slot engine decodes the merged models, and this student has none")
        if lane == "base":
            return merged.base, 0
        return merged.model(True, self.student.adapter_version), merged.epoch
