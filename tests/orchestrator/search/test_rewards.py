import pydantic
import pytest

from orchestrator.search.rewards import (
    RunningMean,
    accumulated_pre,
    direction_term,
    hre,
    length_term,
    path_reward,
    step_pre,
)
from orchestrator.settings import RewardWeights

W = RewardWeights()


def test_defaults_put_correctness_first():
    assert (W.hre, W.pre, W.length_penalty, W.right_bonus, W.wrong_bonus, W.discount, W.dense_cap) == (
        1.0,
        0.0,
        -0.01,
        0.1,
        -0.05,
        0.95,
        0.1,
    )


def test_a_dense_cap_that_could_outweigh_correctness_is_refused():
    with pytest.raises(pydantic.ValidationError, match="dense_cap"):
        RewardWeights(hre=0.4, dense_cap=0.2)
    assert RewardWeights(hre=0.0, pre=1.0, dense_cap=5.0).dense_cap == 5.0  # no correctness term to protect


def test_hre():
    assert hre("Step 1\n#### 1,000", "1000") == 1.0
    assert hre("so the answer is 1000.0 dollars", "1000") == 1.0
    assert hre("#### 999", "1000") == 0.0
    assert hre("#### 7\nthen 1000", "1000") == 0.0  # strict answer wins over a later number
    assert hre("no answer", "1000") == 0.0


def test_step_pre():
    assert step_pre(-0.5, -1.25) == pytest.approx(0.75)
    assert step_pre(-2.0, -1.25) == pytest.approx(-0.75)
    assert step_pre(None, -1.25) == 0.0


def test_accumulated_pre_with_discount():
    a1 = accumulated_pre(0.0, 0.5, 0.95)
    a2 = accumulated_pre(a1, -0.2, 0.95)
    a3 = accumulated_pre(a2, 0.1, 0.95)
    assert a1 == pytest.approx(0.5)
    assert a2 == pytest.approx(-0.2 + 0.95 * 0.5)  # 0.275
    assert a3 == pytest.approx(0.1 + 0.95 * 0.275)  # 0.36125
    assert a3 == pytest.approx(0.1 + 0.95 * -0.2 + 0.95**2 * 0.5)


def test_length_and_direction_terms():
    assert length_term(3, W) == pytest.approx(-0.03)
    assert direction_term([1, 0, None, 1], W) == pytest.approx(0.1 - 0.05 + 0.0 + 0.1)
    assert direction_term([], W) == 0.0


def test_path_reward_sums_weighted_terms():
    original = RewardWeights(hre=0.4, pre=0.6, dense_cap=0.19)
    total, terms = path_reward(1.0, 0.2, 3, [1, 0, None], original)
    assert terms == pytest.approx({"hre": 0.4, "pre": 0.12, "length": -0.03, "direction": 0.05})
    assert total == pytest.approx(0.4 + 0.12 - 0.03 + 0.05)  # 0.54, dense 0.14 within the cap
    custom = RewardWeights(hre=1.0, pre=0.0, length_penalty=0.0, right_bonus=0.0, wrong_bonus=0.0)
    assert path_reward(1.0, 5.0, 9, [0, 0], custom)[0] == 1.0


def test_dense_terms_are_clipped_so_a_wrong_path_never_beats_a_right_one():
    # A wrong path with a long run of teacher-right steps and a huge PRE, against the plainest right path.
    loud = RewardWeights(hre=1.0, pre=10.0, right_bonus=1.0, dense_cap=0.49)
    wrong, terms = path_reward(0.0, 3.0, 8, [1] * 8, loud)
    right, _ = path_reward(1.0, -3.0, 40, [None] * 40, loud)
    assert wrong == pytest.approx(0.49) and terms["dense_clip"] < 0
    assert right == pytest.approx(1.0 - 0.49) and right > wrong
    plain, plain_terms = path_reward(1.0, 0.0, 4, [1, None], W)
    assert plain == pytest.approx(1.0 - 0.04 + 0.1) and "dense_clip" not in plain_terms


def test_running_mean():
    m = RunningMean()
    assert m.mean == 0.0
    for v in (-1.0, -2.0, -3.0):
        m.add(v)
    assert m.mean == pytest.approx(-2.0)
