"""What a backend lets the Student do (backends.py), and that the Student honours it, on a tiny random model.

Unsloth itself needs a CUDA GPU (tests/trainer/test_cuda_trainer.py runs it there, CUDA_TEST_BACKEND=unsloth);
here the Unsloth backend's decoding is exercised on the real peft model with the marks Unsloth gates its patched
forwards on set by hand, as Unsloth sets them.
"""

import pytest

torch = pytest.importorskip("torch")

from services.trainer.backends import (
    FAST_PATH_MARK,
    Backend,
    BackendUnavailable,
    through_transformers_forwards,
    unsloth_backend,
)
from services.trainer.decode_weights import merge_blocker
from services.trainer.items import GenerationRequest
from services.trainer.loading import load_student, make_optimizer
from services.trainer.settings import TrainerSettings
from services.trainer.student import Student
from support.tiny_student import ids


def mark_all(model):
    for module in model.modules():
        setattr(module, FAST_PATH_MARK, True)


def marks(model) -> set:
    return {getattr(m, FAST_PATH_MARK, None) for m in model.modules()}


def test_the_transformers_backend_compiles_nothing_on_cpu_and_merges(student):
    assert student.backend == "transformers" and not student.compiled
    assert merge_blocker(student.model) is None and student.merged_decoder is not None
    with student.decoding(use_adapter=True) as model:
        assert model is student.merged_decoder.student
    with student.decoding(use_adapter=False) as model:
        assert model is student.merged_decoder.base


def test_the_unsloth_backend_turns_off_merging_and_decodes_through_transformers_forwards():
    backend = unsloth_backend()
    assert backend.name == "unsloth" and not backend.compiled_layers
    assert backend.merged_decode_off and backend.decoding is through_transformers_forwards
    assert any("generation" in note for note in backend.notes)


def test_transformers_forwards_clear_the_marks_for_the_call_and_restore_them(student):
    mark_all(student.model)
    try:
        with through_transformers_forwards(student.model) as model:
            assert model is student.model.get_base_model()
            assert marks(student.model) == {False}
        assert marks(student.model) == {True}
        with pytest.raises(RuntimeError), through_transformers_forwards(student.model):
            raise RuntimeError("a failed generation")
        assert marks(student.model) == {True}
    finally:
        for module in student.model.modules():
            delattr(module, FAST_PATH_MARK)


def test_a_student_decodes_as_its_backend_says(student, tiny_random_model_dir, tmp_path):
    """A Student given the Unsloth backend's decoding (on the same model and weights) generates through the causal
    LM with the marks cleared, and greedy decoding gives what the merged plain copies give."""
    prompt = ids(student, "The quick brown fox jumps")
    requests = [GenerationRequest(prompt, n=1, max_tokens=8, temperature=0, logprobs=0)]
    merged = student.generate(requests)[0][0]
    settings = TrainerSettings(model_source=str(tiny_random_model_dir), checkpoint_dir=tmp_path)
    unsloth_like = Backend(name="unsloth", merged_decode_off="a test", decoding=through_transformers_forwards)
    other = Student(
        student.model,
        student.tokenizer,
        make_optimizer(student.trainable, settings, student.device),
        backend=unsloth_like,
        device=student.device,
        name="tiny",
        settings=settings,
    )
    assert other.merged_decoder is None and other.backend == "unsloth"
    seen = []
    layer = student.model.get_base_model().model.layers[0]
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append(getattr(module, FAST_PATH_MARK)))
    mark_all(student.model)
    try:
        through_backend = other.generate(requests)[0][0]
    finally:
        hook.remove()
        for module in student.model.modules():
            delattr(module, FAST_PATH_MARK)
    assert seen and set(seen) == {False}, "generation must run with Unsloth's forwards switched off"
    assert through_backend.token_ids == merged.token_ids
    assert through_backend.token_logprobs == pytest.approx(merged.token_logprobs, abs=1e-4)


def test_asking_for_unsloth_without_a_gpu_says_why(tiny_random_model_dir, tmp_path):
    settings = TrainerSettings(
        model_source=str(tiny_random_model_dir), checkpoint_dir=tmp_path, backend="unsloth", device="cpu"
    )
    with pytest.raises(BackendUnavailable, match="CUDA device"):
        load_student(settings)
