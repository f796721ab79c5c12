"""Statistics for paired evaluations: accuracy, the 2x2 table of paired outcomes, McNemar's exact test.

McNemar's exact test asks whether two classifiers judged on the same problems differ. Only the discordant
pairs carry information: b = problems only the first model gets right, c = problems only the second gets
right. Under H0 (no difference) each discordant pair falls either way with probability 1/2, so
b ~ Binomial(b + c, 1/2) and the two-sided exact p-value is

    p = min(1, 2 * sum_{i=0}^{min(b,c)} C(b+c, i) / 2^(b+c)),     p = 1 when b + c = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_table(first: Sequence[bool], second: Sequence[bool]) -> dict[str, int]:
    """Counts of the four outcomes of paired results (same problems, same order)."""
    if len(first) != len(second):
        raise ValueError(f"paired results differ in length: {len(first)} vs {len(second)}")
    table = {"both_correct": 0, "only_first": 0, "only_second": 0, "both_wrong": 0}
    for a, b in zip(first, second, strict=True):
        key = ("both_correct" if b else "only_first") if a else ("only_second" if b else "both_wrong")
        table[key] += 1
    return table


def accuracy(results: Sequence[bool]) -> float:
    return sum(bool(r) for r in results) / len(results) if results else 0.0


def compare_paired(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float | int]:
    """Accuracies of both, the paired table and McNemar's exact p-value of the difference."""
    table = paired_table(first, second)
    return {
        "n": len(first),
        "first_acc": accuracy(first),
        "second_acc": accuracy(second),
        **table,
        "p_value": mcnemar_exact_p(table["only_first"], table["only_second"]),
    }
