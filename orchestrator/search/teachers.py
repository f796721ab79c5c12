"""The teacher ensemble: prompts for "right" and "wrong" next steps, dynamic weights and fail-over.

Weights. Each teacher keeps two moving averages: its score, of the values its children earn in backprop
(score_t <- score_t + lr * (value - score_t), starting at 0), and its failure rate, of its requests' outcomes
(f_t <- f_t + failure_lr * (x - f_t), x = 1 for a timeout, an HTTP error, a dropped connection or a malformed
answer, 0 for an answer; starting at 0). A teacher that has earned no reward yet counts with the mean score of
those that have. A teacher is picked with probability
    q_t = (1 - explore) * softmax(score / temperature)_t + explore / T
    p_t = q_t * max(1 - f_t, min_health) / sum_u q_u * max(1 - f_u, min_health)
over the healthy teachers of the best tier that has any (tiers are in the order first seen). So a teacher whose
steps lead to better paths is asked more, and a teacher that fails is asked less in proportion to how often it
fails, whatever its score: a dead teacher earns no rewards, and were its score taken as 0 while a working
teacher's went negative, the score alone would come to prefer it (issue #18 saw its weight rise to 0.7). `min_health` keeps a failing teacher tried now
and then, and every answer it gives lowers f_t again (failure_lr 0.5: each answer halves it, as each failure
halves 1 - f_t), so a teacher that recovers wins its share back within a few answers.

Fail-over. When a request fails the next teacher by weight is tried, first in the same tier, then in the
others; the failure is recorded. Only the last teacher in line gets the pool's retries. After
`max_consecutive_failures` failures in a row a teacher rests for `cooldown_s`, doubled with every rest that
follows without an answer in between (at most `max_cooldown_s`), so a dead or hanging endpoint stops costing a
timeout per expansion.
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
    picks: int = 0  # times it was the weighted draw, the first teacher asked for an expansion
    failure_rate: float = 0.0  # moving average of its requests' failures (module docstring)
    consecutive_failures: int = 0
    rests: int = 0  # rests in a row without an answer in between (each doubles the next)
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
        max_cooldown_s: float = 600.0,
        failure_lr: float = 0.5,
        min_health: float = 0.02,
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
        self.max_cooldown_s = max_cooldown_s
        self.failure_lr, self.min_health = failure_lr, min_health
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
        scores = [self.expected_score(n) / max(self.temperature, 1e-6) for n in names]
        m = max(scores)
        exps = [math.exp(s - m) for s in scores]
        total = sum(exps)
        mixed = [(1 - self.explore) * e / total + self.explore / len(names) for e in exps]
        kept = [q * self.health(n) for n, q in zip(names, mixed, strict=True)]
        norm = sum(kept)
        return {n: k / norm for n, k in zip(names, kept, strict=True)}

    def expected_score(self, name: str) -> float:
        """Its score once it has earned a reward; before that the mean score of those that have (0 while none
        has): a teacher not yet judged is taken as average, neither as good as 0 nor as bad as the worst."""
        state = self.states[name]
        if state.rewards:
            return state.score
        judged = [s.score for s in self.states.values() if s.rewards]
        return sum(judged) / len(judged) if judged else 0.0

    def health(self, name: str) -> float:
        """The factor a teacher's failures put on its pick weight: 1 - failure rate, at least min_health."""
        return max(1.0 - self.states[name].failure_rate, self.min_health)

    def record_failure(self, name: str, error: LLMError) -> None:
        """A request of this teacher failed: its failure rate rises, and after max_consecutive_failures in a row it
        rests (longer with each rest in a row)."""
        state = self.states[name]
        state.failures += 1
        state.consecutive_failures += 1
        state.failure_rate += self.failure_lr * (1.0 - state.failure_rate)
        state.last_error = error
        now = time.monotonic()
        if state.consecutive_failures >= self.max_consecutive_failures and state.resting_until <= now:
            state.rests += 1
            rest = min(self.cooldown_s * 2 ** (state.rests - 1), self.max_cooldown_s)
            state.resting_until = now + rest

    def record_success(self, name: str) -> None:
        state = self.states[name]
        state.consecutive_failures = state.rests = 0
        state.resting_until = 0.0
        state.failure_rate -= self.failure_lr * state.failure_rate

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
        if order:
            self.states[order[0]].picks += 1
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
                self.record_failure(name, exc)
                failed.append(str(exc))
                continue
            self.record_success(name)
            return TeacherReply(teacher=name, completion=completion, failed=failed)
        raise AllTeachersFailed("; ".join(failed) or "no teacher available")

    def snapshot(self) -> dict:
        """Every teacher's weight (over the whole ensemble), score, failure rate and counts; `resting_s` is how
        long it still rests, `last_error` the kind of its last failure."""
        w = self.weights()
        now = time.monotonic()
        return {
            n: {
                "weight": w[n],
                "score": s.score,
                "failure_rate": s.failure_rate,
                "rewards": s.rewards,
                "picks": s.picks,
                "requests": s.requests,
                "failures": s.failures,
                "healthy": s.resting_until <= now,
                "resting_s": round(max(0.0, s.resting_until - now), 3),
                "last_error": s.last_error.kind if s.last_error is not None else None,
                "tier": s.endpoint.tier,
            }
            for n, s in self.states.items()
        }
