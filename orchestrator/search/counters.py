"""What every search shape counts while it grows a tree; each shape adds its own counters to these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_ERRORS_KEPT = 50  # a search against a dead endpoint fails the same way thousands of times


@dataclass
class SearchCounters:
    requests: int = 0
    student_tokens: int = 0
    teacher_tokens: int = 0
    teacher_errors: int = 0
    # Student requests that failed because the server could not serve (connection, timeout, 429/5xx, or a student
    # server that could not get the current adapter loaded again): the train loop may search the batch again.
    student_unavailable: int = 0
    checker_calls: int = 0
    errors: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)  # each degraded mode once, in the order first met

    def degrade(self, what: str) -> None:
        if what not in self.degraded:
            self.degraded.append(what)

    def error(self, what: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(what)

    def teacher_answered(self, kind: str, failed: Sequence[str]) -> None:
        """A teacher request answered after the failures `failed` of the teachers tried before it."""
        self.requests += 1 + len(failed)
        if failed:
            self.teacher_errors += len(failed)
            for message in failed:
                self.error(f"teacher ({kind}): {message}")
            self.degrade("teacher_failover")

    def all_teachers_failed(self, kind: str, tried: int, exc: Exception) -> None:
        """A teacher request that every one of the `tried` teachers failed."""
        self.requests += tried
        self.teacher_errors += tried
        self.error(f"teachers ({kind}): {exc}")
        self.degrade("all_teachers_failed")
