"""An answer cut into lines, each with the log-probs of its own tokens.

The fork search (fork.py) makes one tree node per line. Its priors need each line's share of the sampled
tokens' log-probs, which the server gives per token (`Choice.tokens`, `Choice.token_logprobs`). A token belongs
to the line where it starts: the tokens' texts are found in the answer in order (a token not found there, an
end-of-sequence marker for one, stays where the last one ended), and the newlines before a token's start say
its line. Blank lines are dropped and every line is stripped, as the line search writes its steps; their tokens
(the newlines themselves) go to the next line, so every sampled token belongs to exactly one line and a line's
tokens, line after line, are the sample's tokens in order. With the sampled token ids (a student server's
`return_token_ids`) each line also keeps its ids, one per log-prob: what a GRPO item of that line must be scored
on, as sampled text does not always tokenise back to the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Line:
    text: str
    logprobs: list[float] = field(default_factory=list)  # of the tokens that start on this line
    token_ids: list[int] | None = (
        None  # those tokens' ids, one per log-prob (only when the sampler gave them)
    )

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
    text: str,
    tokens: list[str] | None = None,
    token_logprobs: list[float] | None = None,
    token_ids: list[int] | None = None,
) -> list[Line]:
    """The non-blank lines of `text`, stripped, each with the log-probs of the tokens that start on it (none
    when the server gave no tokens) and, when `token_ids` has one id per token, their ids."""
    raw = text.split("\n")
    per_raw: list[list[tuple[float, int]]] = [[] for _ in raw]  # (log-prob, id; -1 without ids)
    with_ids = False
    if tokens and token_logprobs and len(tokens) == len(token_logprobs):
        with_ids = token_ids is not None and len(token_ids) == len(tokens)
        ids = token_ids if with_ids and token_ids is not None else [-1] * len(tokens)
        for start, logprob, token_id in zip(token_starts(text, tokens), token_logprobs, ids, strict=True):
            per_raw[text.count("\n", 0, start)].append((logprob, token_id))
    kept: list[tuple[str, list[tuple[float, int]]]] = []
    carry: list[tuple[float, int]] = []  # tokens of blank lines (the newlines themselves) go to the next line
    for line, sampled in zip(raw, per_raw, strict=True):
        if not line.strip():
            carry += sampled
            continue
        kept.append((line.strip(), carry + sampled))
        carry = []
    if carry and kept:
        kept[-1][1].extend(carry)
    return [
        Line(line, [lp for lp, _ in sampled], [i for _, i in sampled] if with_ids else None)
        for line, sampled in kept
    ]
