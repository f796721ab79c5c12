import pytest

from orchestrator.gsm8k.stats import accuracy, compare_paired, mcnemar_exact_p, paired_table


def test_mcnemar_no_discordant_pairs_is_one():
    assert mcnemar_exact_p(0, 0) == 1.0


def test_mcnemar_hand_computed_values():
    # b=0, c=5: 2 * C(5,0) / 2^5 = 2/32
    assert mcnemar_exact_p(0, 5) == pytest.approx(0.0625)
    # b=1, c=9: 2 * (1 + 10) / 1024 = 22/1024
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)
    # b=2, c=8: 2 * (1 + 10 + 45) / 1024 = 112/1024
    assert mcnemar_exact_p(8, 2) == pytest.approx(112 / 1024)
    # b=3, c=3: the tail passes the middle, the p-value is capped at 1
    assert mcnemar_exact_p(3, 3) == 1.0


def test_mcnemar_is_symmetric_and_rejects_negative_counts():
    assert mcnemar_exact_p(4, 11) == mcnemar_exact_p(11, 4)
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_paired_table_and_comparison():
    base = [True, True, False, False, False]
    student = [True, False, True, True, False]
    assert paired_table(base, student) == {
        "both_correct": 1,
        "only_first": 1,
        "only_second": 2,
        "both_wrong": 1,
    }
    result = compare_paired(base, student)
    assert result["first_acc"] == pytest.approx(0.4)
    assert result["second_acc"] == pytest.approx(0.6)
    assert result["p_value"] == pytest.approx(mcnemar_exact_p(1, 2))
    assert accuracy([]) == 0.0
    with pytest.raises(ValueError):
        paired_table([True], [True, False])
