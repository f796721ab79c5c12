"""The GRPO step (learning.py) through Student.grpo_step, on a tiny randomly initialised model."""

import pytest

torch = pytest.importorskip("torch")

from services.protocol import LossSettings
from services.trainer.items import GrpoItem, ScoreItem
from support.tiny_student import make_student


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_random_model_dir, tmp_path):
    items = [
        GrpoItem(ids_, comp, advantage=adv)
        for ids_, comp, adv in [
            ([5, 6, 7], [8, 9], 1.0),
            ([5, 6], [10, 11, 12], -0.5),
            ([7], [13], 0.25),
            ([9, 9, 9, 9], [14, 15], -1.0),
        ]
    ]
    results = []
    for micro in (1, 4):
        student = make_student(tiny_random_model_dir, tmp_path)  # the same seed: the same start
        results.append(
            student.grpo_step(items, LossSettings(micro_batch_size=micro, beta=0.1, max_grad_norm=1e9))
        )
    full, micro = results[1], results[0]
    assert micro.loss == pytest.approx(full.loss, abs=1e-6)
    assert micro.grad_norm == pytest.approx(full.grad_norm, rel=1e-4)
    assert micro.tokens == full.tokens == 8


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "legacy"])
def test_each_loss_type_moves_the_advantaged_sequence_up(tiny_random_model_dir, tmp_path, loss_type):
    student = make_student(tiny_random_model_dir, tmp_path)
    item = GrpoItem([5, 6, 7], [8, 9, 10], advantage=1.0)
    before = sum(student.logprobs([ScoreItem(item.context_ids, item.completion_ids)])[0])
    result = student.grpo_step([item], LossSettings(type=loss_type, learning_rate=1e-2))
    after = sum(student.logprobs([ScoreItem(item.context_ids, item.completion_ids)])[0])
    assert after > before and result.adapter_version == 1 and result.step == 1
    base = sum(student.logprobs([ScoreItem(item.context_ids, item.completion_ids)], use_adapter=False)[0])
    assert base == pytest.approx(before, abs=1e-5)


def test_invalid_items_change_nothing(student):
    version = student.adapter_version
    with pytest.raises(ValueError, match=r"items\[0\].old_logprobs"):
        student.grpo_step([GrpoItem([1, 2], [3, 4], 1.0, old_logprobs=[-1.0])], LossSettings())
    with pytest.raises(ValueError, match=r"items\[0\].advantage"):
        student.grpo_step([GrpoItem([1, 2], [3, 4], float("nan"))], LossSettings())
    assert student.adapter_version == version
