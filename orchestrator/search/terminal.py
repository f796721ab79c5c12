"""Is a partial solution finished? Rules first; an LLM yes/no check only when the rules are unsure.

Rules, on the newest step:
- a `#### N` line with a number          -> terminal ("answer_line")
- "the answer is N" / "answer: N"        -> terminal ("answer_phrase")
- the model ended the sequence itself    -> terminal ("eos")
- a step cut by the token cap            -> not terminal ("truncated")
- a step that sounds concluding and ends in a number ("so she makes $18 a day.") -> unsure
- anything else                          -> not terminal ("rule")
Unsure cases go to the checker endpoint ("... Answer yes or no."), one call per distinct state (cached, and
concurrent asks for the same state share one request: reason "checker_cached"). A checker failure counts
as "not terminal" and is recorded, so the search goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

from orchestrator.clients.llm import LLMError, LLMPool
from orchestrator.gsm8k.answers import extract_flexible, extract_strict
from orchestrator.settings import EndpointSpec

_ANSWER_PHRASE = re.compile(r"(the\s+(final\s+)?answer\s+is|answer\s*:)\s*[-$]?\s*\.?\d", re.IGNORECASE)
_CONCLUDING = re.compile(
    r"\b(so|therefore|thus|hence|in total|altogether|total|answer|finally)\b", re.IGNORECASE
)
_TRAILING_NUMBER = re.compile(r"\d[\d,]*(\.\d+)?\s*[a-zA-Z%]*\s*[.!]?\s*$")

CHECKER_PROMPT = (
    "Question:\n{question}\n\nPartial solution:\n{partial}\n"
    "Does this partial solution already state the final numeric answer to the question? Answer yes or no."
)


@dataclass(frozen=True)
class Verdict:
    terminal: bool | None  # None = the rules are unsure
    reason: str


def rule_verdict(step: str, finish_reason: str | None = None, eos: bool = False) -> Verdict:
    if extract_strict(step) is not None:
        return Verdict(True, "answer_line")
    if _ANSWER_PHRASE.search(step):
        return Verdict(True, "answer_phrase")
    if eos:
        return Verdict(True, "eos")
    if finish_reason == "length":
        return Verdict(False, "truncated")
    if _CONCLUDING.search(step) and _TRAILING_NUMBER.search(step) and extract_flexible(step) is not None:
        return Verdict(None, "unsure")
    return Verdict(False, "rule")


class TerminalChecker:
    def __init__(
        self,
        pool: LLMPool | None,
        endpoint: EndpointSpec | None,
        cache_size: int = 50_000,
        max_tokens: int = 3,
    ):
        self.pool, self.endpoint = pool, endpoint
        self.cache_size, self.max_tokens = cache_size, max_tokens
        self._cache: OrderedDict[str, bool] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self.llm_calls = 0
        self.cache_hits = 0
        self.errors: list[str] = []

    async def check(
        self, question: str, partial: str, step: str, finish_reason: str | None = None, eos: bool = False
    ) -> Verdict:
        """`partial` is the full solution text including `step`."""
        verdict = rule_verdict(step, finish_reason, eos)
        if verdict.terminal is not None:
            return verdict
        if self.pool is None or self.endpoint is None:
            return Verdict(False, "unsure_no_checker")
        key = hashlib.blake2b(f"{question}\x00{partial}".encode(), digest_size=16).hexdigest()
        if key in self._cache:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return Verdict(self._cache[key], "checker_cached")
        if key in self._pending:
            self.cache_hits += 1
            return Verdict(await asyncio.shield(self._pending[key]), "checker_cached")
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            answer = await self._ask(self.pool, self.endpoint, question, partial)
            if answer is None:
                future.set_result(False)
                return Verdict(False, "checker_failed")
            self._cache[key] = answer
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            future.set_result(answer)
            return Verdict(answer, "checker")
        except BaseException:
            if not future.done():
                future.set_result(False)
            raise
        finally:
            self._pending.pop(key, None)

    async def _ask(self, pool: LLMPool, endpoint: EndpointSpec, question: str, partial: str) -> bool | None:
        self.llm_calls += 1
        messages = [
            {"role": "user", "content": CHECKER_PROMPT.format(question=question, partial=partial.strip())}
        ]
        try:
            completion = await pool.chat(endpoint, messages, max_tokens=self.max_tokens, temperature=0.0, n=1)
        except LLMError as exc:
            self.errors.append(str(exc))
            return None
        word = (completion.choices[0].text if completion.choices else "").strip().lower()
        return word.startswith("yes")
