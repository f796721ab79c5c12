"""The line search (`shape: "line"`) as it ran by default before issue #19, for the tests of search/mcts.py: the
fork search's defaults (no "wrong" teacher, no checker, 256-token answers) would leave most of its paths
untested."""

from __future__ import annotations

from typing import Any

from orchestrator.settings import SearchConfig

LINE_DEFAULTS: dict[str, Any] = {
    "shape": "line",
    "iterations": 8,
    "parallel_simulations": 4,
    "max_tokens": 1024,
    "n_teacher_wrong": 1,
    "temperature": 0.8,
    "use_checker": True,
}


def line_config(**fields: Any) -> SearchConfig:
    """A line-search config: LINE_DEFAULTS with `fields` over them."""
    return SearchConfig(**{**LINE_DEFAULTS, **fields})
