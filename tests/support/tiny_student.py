"""A Student on a tiny randomly initialised model (fast on 2 cores), for the trainer's unit tests."""

from __future__ import annotations

import torch

from services.trainer.loading import load_student
from services.trainer.settings import TrainerSettings


def make_student(model_dir, tmp_path, **overrides):
    """Decoding in the model's own float32 unless `decode_dtype` says otherwise: these tests hold generation to
    float32 references (transformers' generate, the model's scoring) at 1e-4. The bf16 decode copy that "auto"
    picks on CPUs with bf16 instructions has tests of its own (test_decode_weights.py)."""
    settings = TrainerSettings(
        model_source=str(model_dir),
        checkpoint_dir=tmp_path / "ckpt",
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        **{"decode_dtype": "model", **overrides},
    )
    return load_student(settings)


def ids(student, text):
    return student.tokenizer(text, add_special_tokens=False).input_ids


def hf_greedy(student, prompt, max_tokens, use_adapter=True):
    """transformers' own generate on the peft model: the reference the engine must reproduce (its tokens up to,
    not including, an end of sequence, as Sample.token_ids holds them)."""
    with torch.no_grad(), student.adapter(use_adapter):
        input_ids = torch.tensor([prompt])
        out = student.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=student.pad_id,
        )
    tokens = out[0, len(prompt) :].tolist()
    ends = [i for i, t in enumerate(tokens) if t in student.eos_ids]
    return tokens[: ends[0]] if ends else tokens
