"""Counting and cutting text in tokens: the student's tokenizer.json when configured, else word pieces."""

from __future__ import annotations

import re

_PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


class TokenCounter:
    """Counts and cuts text in tokens: a tokenizer.json (the `tokenizers` package) when given, else word pieces
    (runs of letters, single digits, single other characters)."""

    def __init__(self, tokenizer_file: str | None = None):
        self.tokenizer = None
        if tokenizer_file:
            from tokenizers import Tokenizer  # optional: only when a tokenizer file is configured

            self.tokenizer = Tokenizer.from_file(tokenizer_file)

    def spans(self, text: str) -> list[tuple[int, int]]:
        if self.tokenizer is not None:
            return [
                (start, end) for start, end in self.tokenizer.encode(text, add_special_tokens=False).offsets
            ]
        return [m.span() for m in _PIECE.finditer(text)]

    def count(self, text: str) -> int:
        return len(self.spans(text))

    def cut(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """The first `max_tokens` tokens of `text`, and whether anything was cut."""
        spans = self.spans(text)
        if len(spans) <= max_tokens:
            return text, False
        return (text[: spans[max_tokens - 1][1]] if max_tokens > 0 else ""), True
