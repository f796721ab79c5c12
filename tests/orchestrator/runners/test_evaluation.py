import pytest

from orchestrator.gsm8k.data import Problem
from orchestrator.gsm8k.stats import mcnemar_exact_p
from orchestrator.runners.evaluation import accuracy_table, build_report, judge


def rows_for(outcomes):
    """outcomes: {problem index: (base strict ok, student strict ok)} -> judged rows."""
    rows = []
    for i, (base_ok, student_ok) in outcomes.items():
        p = Problem(id=f"test-{i}", prompt="q", answer="7")
        rows.append(judge(p, "base", "#### 7" if base_ok else "so 7 apples"))
        rows.append(judge(p, "student", "#### 7" if student_ok else "#### 8"))
    return rows


def test_judge_strict_and_flexible():
    p = Problem(id="test-0", prompt="q", answer="1000")
    assert judge(p, "base", "It costs $1,000.\n#### 1,000")["strict_correct"]
    row = judge(p, "base", "The answer is 1000")
    assert row["flexible_correct"] and not row["strict_correct"] and row["strict_pred"] is None


def test_report_counts_and_mcnemar_follow_the_rows():
    rows = rows_for(
        {0: (True, True), 1: (False, True), 2: (False, True), 3: (True, False), 4: (False, False)}
    )
    report = build_report(rows, ["base", "student"])
    assert report["n"] == 5
    assert report["models"]["base"]["strict_correct"] == 2
    assert report["models"]["student"]["strict_acc"] == pytest.approx(0.6)
    # flexible: base's "so 7 apples" counts, student's "#### 8" does not
    assert report["models"]["base"]["flexible_correct"] == 5
    strict = report["comparison"]["strict"]
    assert (strict["only_base"], strict["only_student"]) == (1, 2)
    assert strict["p_value"] == pytest.approx(mcnemar_exact_p(1, 2))
    table = accuracy_table(report)
    assert "McNemar" in table and "60.0%" in table


def test_single_model_report_has_no_comparison():
    rows = [r for r in rows_for({0: (True, True)}) if r["model"] == "student"]
    report = build_report(rows, ["student"])
    assert "comparison" not in report and report["models"]["student"]["strict_acc"] == 1.0
