"""The GRPO step (learning.py) through Student.grpo_step, on a tiny randomly initialised model."""

import math

import pytest

torch = pytest.importorskip("torch")

from services.protocol import LossSettings
from services.trainer.items import GrpoItem, ScoreItem
from services.trainer.learning import micro_batches
from services.trainer.student import default_micro_batch_tokens
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


# --- micro-batches packed by a token budget ---------------------------------------------------------------------
def test_micro_batches_fill_a_padded_token_budget_shortest_first():
    lengths = [9, 2, 30, 4, 4, 3, 12]
    batches = micro_batches(lengths, size=None, token_budget=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every item once
    # 3 x 4 tokens; the next 4 alone (4 x 4 > 12); 30, over the budget, alone
    assert batches == [[1, 5, 3], [4], [0], [6], [2]]
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 12 or len(b) == 1
    assert micro_batches(lengths, size=3, token_budget=12) == [[1, 5, 3], [4, 0, 6], [2]]  # a size overrides
    assert micro_batches(lengths, size=None, token_budget=10**6) == [[1, 5, 3, 4, 0, 6, 2]]
    assert micro_batches([], size=None, token_budget=8) == []


def _step_with_gradients(student, items, loss):
    """The real step, with the gradient it hands the optimizer (after accumulation and clipping) recorded."""
    recorded = []
    apply = student.optimizer.step

    def step(*args, **kwargs):
        recorded.extend(p.grad.detach().clone() for p in student.trainable)
        return apply(*args, **kwargs)

    student.optimizer.step = step
    return student.grpo_step(items, loss), recorded


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "legacy"])
def test_packing_by_tokens_changes_neither_the_loss_nor_the_gradient(
    tiny_random_model_dir, tmp_path, loss_type
):
    """Packing only regroups the items: the loss is normalised by the whole step's N (and dr_grpo's L_max), so
    uneven micro-batches of a tight budget give the one-batch loss and gradient."""
    items = [
        GrpoItem(list(range(5, 5 + c)), list(range(40, 40 + y)), advantage=a)
        for c, y, a in [(3, 2, 1.0), (1, 5, -0.5), (6, 1, 0.25), (2, 2, -1.0), (4, 6, 0.75), (7, 3, -0.25)]
    ]
    loss = LossSettings(type=loss_type, beta=0.1, max_grad_norm=1e9)
    runs = {}
    for budget in (10**6, 14):
        student = make_student(tiny_random_model_dir, tmp_path, micro_batch_tokens=budget)  # the same start
        runs[budget] = _step_with_gradients(student, items, loss)
    (whole, whole_grads), (packed, packed_grads) = runs[10**6], runs[14]
    # sequence lengths 5 6 7 4 10 10 at 14 tokens a pass: [4, 5] [6, 7] [10] [10]
    assert (whole.micro_batches, packed.micro_batches) == (1, 4)
    assert packed.loss == pytest.approx(whole.loss, abs=1e-6) and packed.tokens == whole.tokens == 19
    assert packed.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    assert len(packed_grads) == len(whole_grads) > 0
    for a, b in zip(packed_grads, whole_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_a_request_without_micro_batch_size_packs_by_the_trainer_budget(tiny_random_model_dir, tmp_path):
    assert LossSettings().micro_batch_size is None
    assert default_micro_batch_tokens(torch.device("cpu")) == 2048
    assert default_micro_batch_tokens(torch.device("cuda")) == 16384
    student = make_student(tiny_random_model_dir, tmp_path, micro_batch_tokens=8)
    items = [GrpoItem([5, 6], [7, 8], advantage=1.0), GrpoItem([5], [9, 10, 11], advantage=-1.0)]
    assert student.grpo_step(items, LossSettings()).micro_batches == 1  # 2 rows x 4 tokens
    assert student.grpo_step(items, LossSettings(micro_batch_size=1)).micro_batches == 2  # the request's size
    items.append(GrpoItem([5, 6, 7], [8, 9], advantage=0.5))
    assert student.grpo_step(items, LossSettings()).micro_batches == 2  # 3 x 5 > 8: [4, 4] and [5]
