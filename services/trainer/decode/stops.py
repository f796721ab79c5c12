"""Stop strings, checked after every token of every row without decoding every row's text at every step.

A stop string that appears for the first time after token t ends inside the text t added. So a row needs a real
check only when t's text holds the last character of one of its stop strings, or when t's text is not plain (a
partial UTF-8 character decodes as U+FFFD, and a tokenizer may not decode a token the same alone as after text).
Which tokens can trigger is computed once per set of stop strings from a table of every token's text; the check
itself decodes a short tail, and the whole text only on a hit (as the loop before this engine did).
"""

from __future__ import annotations

from collections import OrderedDict

REPLACEMENT = "\ufffd"


class StopChecker:
    def __init__(self, tokenizer, vocab_size: int, cached_sets: int = 64):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._texts: list[str | None] | None = None  # token id -> its text after other text; None = not plain
        self._triggers: OrderedDict[tuple[str, ...], frozenset[int]] = OrderedDict()
        self._cached_sets = cached_sets

    def may_end(self, token: int, stops: tuple[str, ...]) -> bool:
        """False when `token` cannot have completed any of `stops` (no full check needed)."""
        triggers = self._triggers.get(stops)
        if triggers is None:
            triggers = self._trigger_tokens(stops)
        return token in triggers

    def position(self, ids: list[int], stops: tuple[str, ...]) -> int | None:
        return stop_position(self.tokenizer, ids, stops)

    def _trigger_tokens(self, stops: tuple[str, ...]) -> frozenset[int]:
        texts = self._token_texts()
        last_chars = {stop[-1] for stop in stops if stop}
        triggers = frozenset(
            token
            for token, text in enumerate(texts)
            if text is None or REPLACEMENT in text or any(c in text for c in last_chars)
        )
        self._triggers[stops] = triggers
        if len(self._triggers) > self._cached_sets:
            self._triggers.popitem(last=False)
        return triggers

    def _token_texts(self) -> list[str | None]:
        """Each token's text as it reads after other text (decoded behind an anchor token, which keeps the leading
        space that some tokenizers drop from a lone token)."""
        if self._texts is None:
            anchor = self.tokenizer("a", add_special_tokens=False).input_ids[:1] or [0]
            head = self.tokenizer.decode(anchor, skip_special_tokens=True)
            known = min(
                self.vocab_size, len(self.tokenizer)
            )  # ids past the tokenizer's (padded embeddings): None
            decoded = self.tokenizer.batch_decode(
                [[*anchor, token] for token in range(known)], skip_special_tokens=True
            )
            self._texts = [text[len(head) :] if text.startswith(head) else None for text in decoded]
            self._texts += [None] * (self.vocab_size - known)
        return self._texts


def stop_position(tokenizer, ids: list[int], stops) -> int | None:
    """Where the first stop string starts in the decoded text of ids, or None. Called after every token (or every
    token that may_end): the earlier calls found no stop, so a new one overlaps the last token, and a short tail
    tells whether there is one (a token carries at least one byte of text). The whole text is decoded only on a
    hit; decoding it every step cost O(length^2), about as much as the decode itself on a GPU."""
    window = 4 * max(len(stop.encode()) for stop in stops) + 4
    if len(ids) > window:
        tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
        if not any(stop in tail for stop in stops):
            return None
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
