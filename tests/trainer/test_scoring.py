"""Scoring (scoring.py) through Student.logprobs, on a tiny randomly initialised model."""

import pytest

torch = pytest.importorskip("torch")

from services.protocol import LossSettings
from services.trainer.items import GrpoItem, ScoreItem
from support.tiny_student import ids


def test_logprobs_in_a_padded_batch_equal_a_plain_forward(student):
    item = ScoreItem(ids(student, "Natalia sold 48 clips"), ids(student, " in April."))
    batch = student.logprobs([ScoreItem(ids(student, "x"), ids(student, " y z")), item])
    with torch.no_grad():
        logits = student.model(torch.tensor([item.context_ids + item.completion_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    start = len(item.context_ids) - 1
    expected = [logp[start + i, t].item() for i, t in enumerate(item.completion_ids)]
    assert batch[1] == pytest.approx(expected, abs=1e-5)


def test_scoring_gives_every_query_position_a_key_to_attend_to(student):
    """A left pad as a query may attend to nothing; on CUDA in bf16 that row is NaN and its backward poisons
    the real keys' gradients (a GRPO step of mixed lengths failed with a non-finite gradient on the H100). So
    scoring batches are right-padded: position 0 of every row is a real token."""
    seen = []
    hook = student.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"].clone()), with_kwargs=True
    )
    try:
        items = [ScoreItem([5], [6]), ScoreItem([5, 6, 7, 8, 9, 10], [11, 12, 13, 14])]
        student.logprobs(items)
        student.grpo_step(
            [GrpoItem(it.context_ids, it.completion_ids, advantage=1.0) for it in items],
            LossSettings(beta=0.0, learning_rate=1e-9),
        )
    finally:
        hook.remove()
    assert seen and all(bool(mask[:, 0].all()) for mask in seen)
