"""The trainer's checkpoint routes: save (POST /checkpoints), load (POST /checkpoints/load) and list."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .common import LenientRequest

CHECKPOINT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class SaveCheckpointRequest(LenientRequest):
    name: str | None = Field(default=None, pattern=CHECKPOINT_NAME, description="None = step-NNNNNN")


class LoadCheckpointRequest(LenientRequest):
    name: str = Field(pattern=CHECKPOINT_NAME)


class CheckpointInfo(BaseModel):
    """A checkpoint just saved or loaded."""

    name: str
    path: str = Field(description="its folder on the trainer's machine")
    step: int
    adapter_version: int
    step_key: str | None = Field(description="the step_key of the last step it holds")
    bytes: int | None = Field(default=None, description="its size on disk")
    pruned: list[str] = Field(
        default_factory=list,
        description="older checkpoints of its series deleted after this save (TRAINER_CHECKPOINT_KEEP_LAST)",
    )


class CheckpointEntry(BaseModel):
    """One complete checkpoint in the trainer's folder (from its meta record)."""

    name: str
    step: int | None
    adapter_version: int | None
    created: float | None = Field(description="Unix time of the save")
    bytes: int = Field(default=0, description="its size on disk")


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointEntry] = Field(description="oldest first")
    total_bytes: int = Field(default=0, description="everything under the checkpoint folder")
    max_bytes: int | None = Field(
        default=None, description="the budget (TRAINER_CHECKPOINT_MAX_BYTES); None: no budget"
    )
    keep_last: int | None = Field(
        default=None, description="checkpoints kept per series (TRAINER_CHECKPOINT_KEEP_LAST)"
    )


class CheckpointDeleted(BaseModel):
    name: str
    bytes: int = Field(description="bytes freed")
