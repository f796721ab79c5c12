"""The `search` of a /train request small enough to run in seconds on the embedded student, for the integration
tests and benches that need a real train job but do not study the search (its line fields count under
`shape: "line"` only)."""

from __future__ import annotations

TINY_SEARCH: dict[str, object] = {
    "iterations": 2,
    "max_depth": 2,
    "chunk_tokens": 8,
    "max_tokens": 32,
    "parallel_simulations": 2,
    "n_student": 1,
    "n_teacher_right": 1,
    "n_teacher_wrong": 1,
    "rollout": False,
    "use_checker": False,
}
