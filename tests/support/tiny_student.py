"""A Student on a tiny randomly initialised model (fast on 2 cores), for the trainer's unit tests."""

from __future__ import annotations

from services.trainer.loading import load_student
from services.trainer.settings import TrainerSettings


def make_student(model_dir, tmp_path, **overrides):
    settings = TrainerSettings(
        model_source=str(model_dir),
        checkpoint_dir=tmp_path / "ckpt",
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        **overrides,
    )
    return load_student(settings)


def ids(student, text):
    return student.tokenizer(text, add_special_tokens=False).input_ids
