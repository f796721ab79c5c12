"""An answer cut into lines, each with the log-probs of its own tokens.

The fork search (fork.py) makes one tree node per line. Its priors need each line's share of the sampled
tokens' log-probs, which the server gives per token (`Choice.tokens`, `Choice.token_logprobs`). A token belongs
to the line where it starts: the tokens' texts are found in the answer in order (a token not found there, an
end-of-sequence marker for one, stays where the last one ended), and the newlines before a token's start say
its line. Blank lines are dropped and every line is stripped, as the line search writes its steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Line:
    text: str
    logprobs: list[float] = field(default_factory=list)  # of the tokens that start on this line

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None

    @property
    def surprisal(self) -> float | None:
        """The mean negative log-prob of the line's tokens: how unsure the student was writing it."""
        mean = self.mean_logprob
        return None if mean is None else -mean


def token_starts(text: str, tokens: list[str]) -> list[int]:
    """Where each token starts in `text`, searching forward from the end of the previous one."""
    starts, cursor = [], 0
    for token in tokens:
        at = text.find(token, cursor) if token else -1
        if at < 0:
            starts.append(min(cursor, max(len(text) - 1, 0)))
            continue
        starts.append(at)
        cursor = at + len(token)
    return starts


def split_answer(
    text: str, tokens: list[str] | None = None, token_logprobs: list[float] | None = None
) -> list[Line]:
    """The non-blank lines of `text`, stripped, each with the log-probs of the tokens that start on it (none
    when the server gave no tokens)."""
    raw = text.split("\n")
    per_raw: list[list[float]] = [[] for _ in raw]
    if tokens and token_logprobs and len(tokens) == len(token_logprobs):
        for start, logprob in zip(token_starts(text, tokens), token_logprobs, strict=True):
            per_raw[text.count("\n", 0, start)].append(logprob)
    lines: list[Line] = []
    carry: list[float] = []  # tokens of blank lines (the newlines themselves) go to the next line
    for line, logprobs in zip(raw, per_raw, strict=True):
        if not line.strip():
            carry += logprobs
            continue
        lines.append(Line(line.strip(), carry + logprobs))
        carry = []
    if carry and lines:
        lines[-1].logprobs += carry
    return lines
