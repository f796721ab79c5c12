"""The line search (`shape: "line"`) as it ran by default before issue #19 (settings.LINE_SEARCH), for the
tests of search/mcts.py: the fork search's defaults (no "wrong" teacher, no checker, 256-token answers) would
leave most of its paths untested."""

from __future__ import annotations

from typing import Any

from orchestrator.settings import LINE_SEARCH, SearchConfig


def line_config(**fields: Any) -> SearchConfig:
    """A line-search config: settings.LINE_SEARCH with `fields` over them."""
    return SearchConfig(**{**LINE_SEARCH, **fields})
