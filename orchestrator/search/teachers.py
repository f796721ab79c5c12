"""The teacher ensemble: prompts for "right" and "wrong" next steps, dynamic weights and fail-over.

Weights. Each teacher keeps an exponential moving average of the values its children earn in backprop
(score_t <- score_t + lr * (value - score_t), starting at 0). A teacher is picked with probability
    p_t = (1 - explore) * softmax(score / temperature)_t + explore / T
over the healthy teachers of the best tier that has any (tiers are in the order first seen), so a teacher
whose steps lead to better paths is asked more, and every teacher keeps being tried a little.

Fail-over. When a request fails the next teacher by weight is tried, first in the same tier, then in the
others; the failure is recorded. Only the last teacher in line gets the pool's retries. After
`max_consecutive_failures` failures in a row a teacher rests for `cooldown_s`, so a dead or hanging endpoint
stops costing a timeout per expansion.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field

from orchestrator.clients.llm import Completion, LLMError, LLMPool, RetryPolicy
from orchestrator.settings import EndpointSpec

SYSTEM = "You are a careful math tutor who writes grade-school solutions one short step per line."
RIGHT_PROMPT = (
    "Question:\n{question}\n\nPartial solution so far:\n<partial>\n{partial}</partial>\n\n"
    "Write only the next single step of a correct solution, on one line. If this step reaches the final "
    "answer, write it as '#### <number>'."
)
WRONG_PROMPT = (
    "Question:\n{question}\n\nPartial solution so far:\n<partial>\n{partial}</partial>\n\n"
    "Write only the next single step, on one line, but make it plausible but wrong: a typical student "
    "mistake (a wrong operation, a misread quantity or an arithmetic slip). If this step reaches a final "
    "answer, write "
    "it as '#### <number>'. Do not say that it is wrong."
)

# search.one_line_steps=false: a teacher child is a whole answer, like the student's children there.
RIGHT_WHOLE_PROMPT = (
    "Question:\n{question}\n\nPartial solution so far:\n<partial>\n{partial}</partial>\n\n"
    "Write the rest of a correct solution, one short step per line, and end with a line '#### <number>'."
)
WRONG_WHOLE_PROMPT = (
    "Question:\n{question}\n\nPartial solution so far:\n<partial>\n{partial}</partial>\n\n"
    "Write the rest of a plausible but wrong solution, one short step per line, with a typical student "
    "mistake (a wrong operation, a misread quantity or an arithmetic slip), and end with a line "
    "'#### <number>'. Do not say that it is wrong."
)

REFERENCE_HINT = (
    "\n\nA reference solution, for you only (do not mention it; write the next step in your own words, "
    "one step only):\n<reference>\n{reference}\n</reference>"
)


def teacher_messages(
    kind: str, question: str, partial: str, reference: str | None = None, whole: bool = False
) -> list[dict]:
    """The teacher's chat prompt: the next step, or (`whole`) the rest of the solution. A `reference` (the gold
    solution, search.teacher_reference) is shown to a "right" teacher only: a weak teacher (the embedded 135M
    base) then writes correct steps far more often, so the search finds correct, well-formatted paths to
    learn from."""
    if whole:
        template = RIGHT_WHOLE_PROMPT if kind == "right" else WRONG_WHOLE_PROMPT
    else:
        template = RIGHT_PROMPT if kind == "right" else WRONG_PROMPT
    content = template.format(question=question.strip(), partial=partial)
    if reference and kind == "right":
        content += REFERENCE_HINT.format(reference=clean_reference(reference))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def first_line(text: str) -> str:
    """Teachers sometimes open with a blank line or echo a label; keep the first non-empty line."""
    for line in text.split("\n"):
        line = line.strip()
        if line:
            return line
    return ""


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
# Lines in which a small teacher echoes its prompt: a tag alone, or the words that introduce the reference.
_PROMPT_ECHO = re.compile(r"^</?(reference|partial)>$|reference solution", re.IGNORECASE)


def clean_reference(solution: str) -> str:
    """A GSM8K gold solution without its calculator notes ("48/2 = <<48/2=24>>24" -> "48/2 = 24"), which a
    small teacher copies and the student then learns to write, and without its `#### N` line: shown the final
    answer, the 135M teacher came to answer "#### 72" and nothing else, correct and worthless to learn from
    (a GPU run collapsed on it)."""
    lines = [line for line in solution.split("\n") if not line.strip().startswith("####")]
    return _CALCULATOR_NOTE.sub("", "\n".join(lines)).strip()


def teacher_solution(text: str) -> str:
    """A whole teacher answer as solution lines: blank lines and echoes of the prompt dropped, and nothing
    after the first `####` line (small teachers go on after their answer)."""
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or _PROMPT_ECHO.search(line):
            continue
        lines.append(line)
        if line.startswith("####"):
            break
    return "\n".join(lines)


NO_RETRY = RetryPolicy(max_retries=0)


class AllTeachersFailed(Exception):
    pass


@dataclass
class TeacherState:
    endpoint: EndpointSpec
    score: float = 0.0
    rewards: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    resting_until: float = 0.0
    last_error: LLMError | None = None  # its .kind says what went wrong


@dataclass
class TeacherReply:
    teacher: str
    completion: Completion
    failed: list[str] = field(default_factory=list)  # errors of teachers tried before this one


class TeacherEnsemble:
    def __init__(
        self,
        endpoints: list[EndpointSpec],
        learning_rate: float = 0.2,
        temperature: float = 0.25,
        explore: float = 0.1,
        max_consecutive_failures: int = 2,
        cooldown_s: float = 30.0,
        seed: int | None = None,
    ):
        if not endpoints:
            raise ValueError("a teacher ensemble needs at least one endpoint")
        names = [e.name for e in endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique: {names}")
        self.states = {e.name: TeacherState(endpoint=e) for e in endpoints}
        self.tier_order = list(dict.fromkeys(e.tier or "default" for e in endpoints))
        self.learning_rate, self.temperature, self.explore = learning_rate, temperature, explore
        self.max_consecutive_failures, self.cooldown_s = max_consecutive_failures, cooldown_s
        self.rng = random.Random(seed)

    # --- weights ------------------------------------------------------------------------------------------
    def tiers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t: [] for t in self.tier_order}
        for name, s in self.states.items():
            out[s.endpoint.tier or "default"].append(name)
        return out

    def healthy(self, name: str, now: float | None = None) -> bool:
        return self.states[name].resting_until <= (time.monotonic() if now is None else now)

    def weights(self, names: list[str] | None = None) -> dict[str, float]:
        names = list(self.states) if names is None else names
        if not names:
            return {}
        scores = [self.states[n].score / max(self.temperature, 1e-6) for n in names]
        m = max(scores)
        exps = [math.exp(s - m) for s in scores]
        total = sum(exps)
        return {
            n: (1 - self.explore) * e / total + self.explore / len(names)
            for n, e in zip(names, exps, strict=True)
        }

    def record_reward(self, name: str, value: float) -> None:
        state = self.states.get(name)
        if state is None:
            return
        state.rewards += 1
        state.score += self.learning_rate * (value - state.score)

    def order(self, exclude: frozenset[str] = frozenset()) -> list[str]:
        """Teachers to try, in order: a weighted draw in the best tier with a healthy teacher first, then the
        rest of that tier by weight, then the other tiers; resting teachers last (better than nothing)."""
        now = time.monotonic()
        ordered: list[str] = []
        for names in self.tiers().values():
            names = [n for n in names if n not in exclude]
            healthy = [n for n in names if self.healthy(n, now)]
            if healthy:
                w = self.weights(healthy)
                first = self.rng.choices(healthy, weights=[w[n] for n in healthy])[0]
                ordered.append(first)
                ordered += sorted((n for n in healthy if n != first), key=lambda n: -w[n])
        resting = [n for n in self.states if n not in exclude and n not in ordered]
        return ordered + sorted(resting, key=lambda n: self.states[n].resting_until)

    # --- requests -----------------------------------------------------------------------------------------
    async def generate(
        self,
        pool: LLMPool,
        kind: str,
        question: str,
        partial: str,
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        reference: str | None = None,
        whole: bool = False,
    ) -> TeacherReply:
        """n next steps (or, `whole`, n rests of the solution) of `kind` ("right" | "wrong") from the best
        available teacher, failing over."""
        messages = teacher_messages(kind, question, partial, reference, whole)
        failed: list[str] = []
        order = self.order()
        for i, name in enumerate(order):
            state = self.states[name]
            state.requests += 1
            # While another teacher is left to fail over to, don't spend retries (or timeouts) on this one.
            retry = NO_RETRY if i < len(order) - 1 else None
            try:
                completion = await pool.chat(
                    state.endpoint,
                    messages,
                    retry=retry,
                    n=n,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    stop=["\n\n"],
                    seed=seed,
                )
            except LLMError as exc:
                state.failures += 1
                state.consecutive_failures += 1
                state.last_error = exc
                if state.consecutive_failures >= self.max_consecutive_failures:
                    state.resting_until = time.monotonic() + self.cooldown_s
                failed.append(str(exc))
                continue
            state.consecutive_failures = 0
            state.resting_until = 0.0
            return TeacherReply(teacher=name, completion=completion, failed=failed)
        raise AllTeachersFailed("; ".join(failed) or "no teacher available")

    def snapshot(self) -> dict:
        w = self.weights()
        return {
            n: {
                "weight": w[n],
                "score": s.score,
                "rewards": s.rewards,
                "requests": s.requests,
                "failures": s.failures,
                "healthy": self.healthy(n),
                "tier": s.endpoint.tier,
            }
            for n, s in self.states.items()
        }
