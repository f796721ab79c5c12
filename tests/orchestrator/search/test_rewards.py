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


def test_defaults_are_the_originals():
    assert (W.hre, W.pre, W.length_penalty, W.right_bonus, W.wrong_bonus, W.discount) == (
        0.4,
        0.6,
        -0.01,
        0.1,
        -0.05,
        0.95,
    )


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
    total, terms = path_reward(1.0, 0.36125, 3, [1, 0, None], W)
    assert terms == pytest.approx({"hre": 0.4, "pre": 0.6 * 0.36125, "length": -0.03, "direction": 0.05})
    assert total == pytest.approx(0.4 + 0.21675 - 0.03 + 0.05)  # 0.63675
    custom = RewardWeights(hre=1.0, pre=0.0, length_penalty=0.0, right_bonus=0.0, wrong_bonus=0.0)
    assert path_reward(1.0, 5.0, 9, [0, 0], custom)[0] == 1.0


def test_running_mean():
    m = RunningMean()
    assert m.mean == 0.0
    for v in (-1.0, -2.0, -3.0):
        m.add(v)
    assert m.mean == pytest.approx(-2.0)
