"""The GRPO step (learning.py) through Student.grpo_step, on a tiny randomly initialised model."""

import math

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


def test_sampler_log_probs_weight_the_step_and_items_without_them_step_as_before(
    tiny_random_model_dir, tmp_path
):
    """Through the real step: sampler log-probs equal to the trainer's own give the very step of items without
    them; lower ones (a sampler that found the tokens less likely) weigh the tokens up to the cap, higher ones
    weigh them down, and the response says by how much."""
    contexts = [([5, 6, 7], [8, 9, 10]), ([5, 6], [11, 12])]
    loss = LossSettings(beta=0.0, max_grad_norm=1e9, is_cap=2.0)

    def step(shift: float | None):
        student = make_student(tiny_random_model_dir, tmp_path)  # the same seed: the same start
        own = student.logprobs([ScoreItem(c, y) for c, y in contexts])
        items = [
            GrpoItem(c, y, advantage=adv, sampler_logprobs=None if shift is None else [v + shift for v in lp])
            for (c, y), adv, lp in zip(contexts, [1.0, -0.5], own, strict=True)
        ]
        return student.grpo_step(items, loss)

    plain, same, lower, higher = step(None), step(0.0), step(-5.0), step(math.log(2.0))
    assert (plain.is_weight_mean, plain.is_truncated_fraction) == (1.0, 0.0)
    assert same.loss == pytest.approx(plain.loss, abs=1e-6)
    assert same.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    assert same.is_weight_mean == pytest.approx(1.0, abs=1e-5) and same.is_truncated_fraction == 0.0
    # every token: exp(5) cut to 2, so loss and gradient double
    assert lower.loss == pytest.approx(2.0 * plain.loss, rel=1e-4)
    assert lower.grad_norm == pytest.approx(2.0 * plain.grad_norm, rel=1e-4)
    assert lower.is_weight_mean == pytest.approx(2.0) and lower.is_truncated_fraction == 1.0
    # every token: exp(-log 2) = 0.5, below the cap: half
    assert higher.loss == pytest.approx(0.5 * plain.loss, rel=1e-4)
    assert higher.is_weight_mean == pytest.approx(0.5, rel=1e-4) and higher.is_truncated_fraction == 0.0


def test_invalid_items_change_nothing(student):
    version = student.adapter_version
    with pytest.raises(ValueError, match=r"items\[0\].old_logprobs"):
        student.grpo_step([GrpoItem([1, 2], [3, 4], 1.0, old_logprobs=[-1.0])], LossSettings())
    with pytest.raises(ValueError, match=r"items\[0\].advantage"):
        student.grpo_step([GrpoItem([1, 2], [3, 4], float("nan"))], LossSettings())
    with pytest.raises(ValueError, match=r"items\[0\].sampler_logprobs: 3 values for 2"):
        student.grpo_step([GrpoItem([1, 2], [3, 4], 1.0, sampler_logprobs=[-1.0] * 3)], LossSettings())
    assert student.adapter_version == version
