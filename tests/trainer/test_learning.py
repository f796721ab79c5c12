"""The GRPO step (learning.py) through Student.grpo_step, on a tiny randomly initialised model."""

import copy
import math
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from services.protocol import LossSettings
from services.trainer.errors import NotFiniteStep
from services.trainer.grpo import grpo_loss
from services.trainer.items import GrpoItem, ScoreItem
from services.trainer.learning import micro_batches, update_batches
from services.trainer.scoring import completion_logprobs
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


# --- several optimizer steps per GRPO step (loss.updates) -------------------------------------------------------
def test_update_batches_cut_shuffled_groups_into_near_equal_mini_batches():
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert update_batches(groups, 1, seed=5) == [list(range(12))]  # one update: every item, in order
    batches = update_batches(groups, 2, seed=5)
    assert sorted(i for b in batches for i in b) == list(range(12)) and [len(b) for b in batches] == [6, 6]
    for batch in batches:  # the cut falls between groups: each group whole in one mini-batch
        assert all(groups.count(groups[i]) == sum(groups[j] == groups[i] for j in batch) for i in batch)
    assert update_batches(groups, 2, seed=5) == batches  # the same step number: the same cut
    assert any(update_batches(groups, 2, seed=s) != batches for s in range(6, 12))  # the shuffle moves
    # 12 items in 5: sizes 3 3 2 2 2; more updates than items: one item each
    assert [len(b) for b in update_batches(groups, 5, seed=0)] == [3, 3, 2, 2, 2]
    assert sorted(map(len, update_batches([None] * 3, 16, seed=0))) == [1, 1, 1]


def _items_for_updates():
    return [
        GrpoItem(list(range(5, 5 + c)), list(range(40, 40 + y)), advantage=a)
        for c, y, a in [(3, 2, 1.0), (1, 5, -0.5), (6, 1, 0.25), (2, 2, -1.0), (4, 3, 0.75), (7, 3, -0.25)]
    ]


def test_one_update_is_the_single_step_over_all_items(tiny_random_model_dir, tmp_path):
    """loss.updates = 1 is the step as it was: one grpo_loss over every item (N = the step's items, L_max its
    longest completion), one clipped AdamW step, computed here by hand from the same start."""
    items = _items_for_updates()
    loss = LossSettings(type="dr_grpo", beta=0.0, clip_eps_high=0.28, learning_rate=1e-2, max_grad_norm=0.5)
    stepped = make_student(tiny_random_model_dir, tmp_path)
    result = stepped.grpo_step(items, loss)

    by_hand = make_student(tiny_random_model_dir, tmp_path)  # the same seed: the same start
    by_hand.model.train()
    logp, mask = completion_logprobs(by_hand, items)
    terms = grpo_loss(
        logp,
        mask,
        torch.tensor([it.advantage for it in items]),
        loss_type="dr_grpo",
        beta=0.0,
        clip_eps_high=0.28,
        num_sequences=len(items),
        max_length=5,
    )
    terms.loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(by_hand.trainable, 0.5))
    for group in by_hand.optimizer.param_groups:
        group["lr"] = 1e-2
    by_hand.optimizer.step()

    assert (result.updates, result.step, result.adapter_version) == (1, 1, 1)
    assert result.loss == pytest.approx(float(terms.loss.detach()), abs=1e-6)
    assert result.grad_norm == pytest.approx(grad_norm, rel=1e-5)
    (update,) = result.per_update
    assert (update.items, update.tokens, update.loss, update.grad_norm) == (
        6,
        16,
        result.loss,
        result.grad_norm,
    )
    for a, b in zip(stepped.trainable, by_hand.trainable, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _adam_steps(student) -> set[int]:
    return {int(state["step"]) for state in student.optimizer.state.values()}


def test_two_updates_make_two_optimizer_steps_against_the_adapter_before_the_first(
    tiny_random_model_dir, tmp_path
):
    """The second update's ratio is taken against the adapter before the first update: with a clip range of
    1e-4 nothing is clipped in the first mini-batch (ratio exactly 1) and the second mini-batch, whose
    completions the first update made likelier, is clipped. Two AdamW steps, one adapter version."""
    items = [GrpoItem([5, 6, 7], [8, 9, 10], advantage=1.0) for _ in range(4)]
    loss = LossSettings(type="grpo", beta=0.0, clip_eps=1e-4, learning_rate=1e-2, max_grad_norm=1e9)
    one, two = (make_student(tiny_random_model_dir, tmp_path) for _ in range(2))
    single = one.grpo_step(items, loss)
    double = two.grpo_step(items, loss.model_copy(update={"updates": 2}))

    assert (single.updates, double.updates) == (1, 2) and _adam_steps(one) == {1} and _adam_steps(two) == {2}
    assert (double.step, double.adapter_version) == (1, 1)  # the version names what the sampler sees
    first, second = double.per_update
    assert (first.items, second.items) == (2, 2) and first.tokens + second.tokens == double.tokens == 12
    assert first.clip_fraction == 0.0 and second.clip_fraction == 1.0 and double.clip_fraction == 0.5
    assert double.micro_batches == 2 and double.grad_norm == pytest.approx(
        (first.grad_norm + second.grad_norm) / 2
    )
    assert any(not torch.equal(a, b) for a, b in zip(one.trainable, two.trainable, strict=True))
    score = [ScoreItem([5, 6, 7], [8, 9, 10])]
    assert sum(two.logprobs(score)[0]) > sum(one.logprobs(score)[0])  # two steps up, each of about lr


def test_old_log_probs_scored_up_front_equal_ones_the_caller_sends(tiny_random_model_dir, tmp_path):
    """Items without old_logprobs get them from the adapter before the first update: the same step as sending
    the trainer's own scores of that adapter, and not the step of a stale old policy."""
    items = _items_for_updates()
    loss = LossSettings(
        type="dr_grpo", beta=0.0, clip_eps=0.05, learning_rate=5e-2, max_grad_norm=1e9, updates=3
    )

    def run(shift: float | None):
        student = make_student(tiny_random_model_dir, tmp_path)
        sent = items
        if shift is not None:
            own = student.logprobs([ScoreItem(it.context_ids, it.completion_ids) for it in items])
            sent = [
                replace(it, old_logprobs=[v + shift for v in lp]) for it, lp in zip(items, own, strict=True)
            ]
        return student, student.grpo_step(sent, loss)

    (omitted, plain), (given, same), (_, stale) = run(None), run(0.0), run(-1.0)
    assert plain.updates == same.updates == 3
    for a, b in zip(plain.per_update, same.per_update, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-6) and a.clip_fraction == b.clip_fraction
    for a, b in zip(omitted.trainable, given.trainable, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert stale.per_update[0].clip_fraction > 0.0  # a ratio of e: clipped from the first update


def test_a_non_finite_later_update_leaves_adapter_and_optimizer_as_before_the_step(
    tiny_random_model_dir, tmp_path
):
    """The first update is applied, the second overflows (weight 1e308 is inf in float32): the step raises, and
    the adapter and the optimizer's state are those before the step, also when AdamW had no state yet."""
    student = make_student(tiny_random_model_dir, tmp_path)
    loss = LossSettings(beta=0.0, learning_rate=1e-2, updates=2)
    optimizer_steps = []
    apply = student.optimizer.step

    def counted(*args, **kwargs):
        optimizer_steps.append(1)
        return apply(*args, **kwargs)

    student.optimizer.step = counted

    def failing_step():
        items = [GrpoItem([5, 6], [7 + i, 8], advantage=1.0 - i) for i in range(4)]
        later = update_batches([None] * 4, 2, seed=student.step)[1][0]
        items[later] = replace(items[later], weight=1e308)
        weights = [p.detach().clone() for p in student.trainable]
        state = copy.deepcopy(student.optimizer.state_dict())
        version, step, before = student.adapter_version, student.step, len(optimizer_steps)
        with pytest.raises(NotFiniteStep):
            student.grpo_step(items, loss)
        assert len(optimizer_steps) == before + 1  # the first update ran, and was undone
        assert (student.adapter_version, student.step) == (version, step)
        assert all(torch.equal(p, w) for p, w in zip(student.trainable, weights, strict=True))
        after = student.optimizer.state_dict()["state"]
        assert after.keys() == state["state"].keys()
        for key, saved in state["state"].items():
            assert all(torch.equal(after[key][name], value) for name, value in saved.items())

    failing_step()  # AdamW without state: none after it either
    assert student.optimizer.state_dict()["state"] == {}
    good = [GrpoItem([5, 6], [7, 8], advantage=1.0), GrpoItem([5, 6], [9, 8], advantage=-1.0)]
    assert student.grpo_step(good, loss).updates == 2 and _adam_steps(student) == {2}
    failing_step()  # AdamW with the state of two updates: the same state after it
    assert student.grpo_step(good, loss).step == 2 and _adam_steps(student) == {4}
