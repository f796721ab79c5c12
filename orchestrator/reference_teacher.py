"""The reference teacher: an OpenAI-compatible server that stands in for a strong (70B-class) teacher by writing
from the worked reference solution of a GSM8K train problem.

Teachers of the size the product is meant for solve 90-95% of GSM8K; the only model these machines hold is the
135M student. This server plays such a teacher without a model: it reads the teacher prompts the orchestrator
sends (orchestrator/teachers.py: a "right" or a "wrong" step, one line or the whole rest of the solution), finds
the problem by its question text among the GSM8K train problems (never test: an unknown question is answered
404), works out how far the partial solution has got along the reference, and writes

- right, one line:  the next reference step (calculator notes removed), or `#### N` once every step is done;
- right, whole:     the rest of the reference, ending in `#### N`;
- wrong, one line:  the next step with a typical mistake: an arithmetic slip in its result, a misread operand or
                    a wrong operation (the result recomputed), or a wrong final answer once every step is done
                    (a step with no number to get wrong is passed over for the next one that has one);
- wrong, whole:     that wrong step, then the rest of the reference with the error carried through every later
                    calculation, ending in a wrong `#### N`.

Alignment (steps_done). A GSM8K step carries a calculator note `<<48/2=24>>`; the step's result is the note's
result (else the line's last number). Taken in order, each reference step claims the first line of the partial
solution not yet claimed that is the step as it is, or shows the step's result after an `=`, or ends in it (a
number that is also in the question must follow an `=`, so restating the question does not count). The next step
is the one after the last step claimed, so a teacher continuing a partial that went wrong writes the first
correct step after the last one it got right, as a tutor would.

Sampling. "Right" has one answer, so its n choices are the same text. "Wrong" choices are drawn from a
random.Random seeded by (seed, choice index, question, partial): deterministic for a given seed, different
across the n choices of a request where the step allows it; without a seed every request draws afresh.
`temperature` is accepted and ignored. `max_tokens` cuts the text (finish_reason "length"), `stop` strings cut
it ("stop" with the string as `stop_reason`), a text that ends by itself finishes "stop" with `stop_reason` null
(as vLLM reports an end of sequence). Tokens are counted with a tokenizer file when one is configured
(REFERENCE_TEACHER_TOKENIZER: a tokenizer.json, e.g. the student's, so `usage` is in the student's tokens), else
as word pieces (runs of letters, single digits, single other characters): 14% fewer than SmolLM2's tokenizer
counts on GSM8K reference solutions (38,951 vs 45,253 tokens on the first 500).

Run it:  python -m orchestrator.reference_teacher --port 8010    (GSM8K from GSM8K_PATH, else the hub)
and use it as the teachers:  TEACHER_TIER=custom
    TEACHERS=[{"name":"reference","base_url":"http://127.0.0.1:8010/v1","model":"reference"}]
Routes: POST /v1/chat/completions, GET /v1/models, GET /health. The engine (everything above the HTTP section)
knows nothing of HTTP.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import operator
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.answers import parse_number
from orchestrator.data import Problem, load_gsm8k
from orchestrator.teachers import (
    RIGHT_PROMPT,
    RIGHT_WHOLE_PROMPT,
    WRONG_PROMPT,
    WRONG_WHOLE_PROMPT,
    clean_reference,
)


# --- errors: each carries the HTTP status it stands for ------------------------------------------------------
class ReferenceTeacherError(Exception):
    status = 400
    param: str | None = None


class UnreadablePrompt(ReferenceTeacherError):
    """The messages are not one of the orchestrator's teacher prompts."""

    status, param = 400, "messages"


class UnknownQuestion(ReferenceTeacherError):
    """The question is not a GSM8K train problem (test problems are never answered)."""

    status, param = 404, "messages"


class UnknownModel(ReferenceTeacherError):
    status, param = 404, "model"


class Unsupported(ReferenceTeacherError):
    """A request field this server cannot honour (log-probs: there is no model to take them from)."""

    status = 400


# --- numbers ---------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\w.])-?\$?\d[\d,]*(?:\.\d+)?|(?<![\w.])-?\.\d+")
_LEADING_NUMBER = re.compile(r"^(\s*\$?)(-?\d[\d,]*(?:\.\d+)?)")
_NOTE = re.compile(r"<<([^<>]*)>>")


def number_value(text: str) -> float | None:
    """The value of one number as written ("$1,000.50" -> 1000.5)."""
    return parse_number(text.replace("$", ""))


def format_number(value: float) -> str:
    """A number as GSM8K writes it: integers without a point, others with at most 2 decimals."""
    if abs(value - round(value)) < 1e-9:
        return str(round(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def as_shown(value: float | None) -> float | None:
    """A value rounded as format_number writes it (12/59 shows as 0.2, the same as 12/60)."""
    return None if value is None else float(format_number(value))


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def evaluate(expression: str) -> float | None:
    """The value of a calculator note's arithmetic (+ - * / // % and parentheses), None if it is anything else
    or divides by zero."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError("not arithmetic")

    try:
        return walk(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError, OverflowError):
        return None


# --- the reference solutions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceStep:
    raw: str  # the line as GSM8K writes it, calculator note kept
    text: str  # as shown to the student: the note removed
    result: float | None  # what the step computes: its note's result, else the line's last number


@dataclass(frozen=True)
class Reference:
    question: str
    steps: tuple[ReferenceStep, ...]
    answer: str  # the gold final number, canonical

    @property
    def answer_line(self) -> str:
        return f"#### {self.answer}"


def parse_step(raw: str) -> ReferenceStep:
    notes = _NOTE.findall(raw)
    result = None
    if notes and "=" in notes[-1]:
        result = number_value(notes[-1].rsplit("=", 1)[1])
    if result is None:
        numbers = _NUMBER.findall(_NOTE.sub("", raw))
        result = number_value(numbers[-1]) if numbers else None
    return ReferenceStep(raw=raw, text=clean_reference(raw), result=result)


def parse_reference(problem: Problem) -> Reference:
    solution = problem.info.get("solution") or ""
    lines = [line.strip() for line in solution.split("\n")]
    steps = tuple(parse_step(line) for line in lines if line and not line.startswith("####"))
    return Reference(question=problem.prompt, steps=steps, answer=problem.answer)


def question_key(question: str) -> str:
    """Questions are matched with their whitespace collapsed (the teacher prompt strips the question)."""
    return " ".join(question.split())


class ReferenceBook:
    """The GSM8K train problems by question text."""

    def __init__(self, problems: list[Problem]):
        if any((p.info or {}).get("split", "train") != "train" for p in problems):
            raise ValueError("the reference teacher holds GSM8K train problems only")
        self._by_question = {question_key(p.prompt): parse_reference(p) for p in problems}

    @classmethod
    def from_gsm8k(cls, path: str | None = None) -> ReferenceBook:
        return cls(load_gsm8k("train", path))

    def __len__(self) -> int:
        return len(self._by_question)

    def find(self, question: str) -> Reference:
        reference = self._by_question.get(question_key(question))
        if reference is None:
            raise UnknownQuestion(
                f"the question is not one of the {len(self)} GSM8K train problems this reference teacher holds "
                f"(it answers train problems only, never test): {question[:120]!r}"
            )
        return reference


# --- reading the teacher prompt ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherAsk:
    kind: Literal["right", "wrong"]
    whole: bool
    question: str
    partial: str


_PROMPT_HEAD = "Question:\n"
_PARTIAL_OPEN = "\n\nPartial solution so far:\n<partial>\n"
_PARTIAL_CLOSE = "</partial>\n\n"
# The instruction after the partial solution says which teacher is asked (teachers.py's four templates).
_INSTRUCTIONS = {
    template.split(_PARTIAL_CLOSE, 1)[1]: mode
    for template, mode in (
        (RIGHT_PROMPT, ("right", False)),
        (WRONG_PROMPT, ("wrong", False)),
        (RIGHT_WHOLE_PROMPT, ("right", True)),
        (WRONG_WHOLE_PROMPT, ("wrong", True)),
    )
}


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def read_teacher_prompt(messages: list[dict]) -> TeacherAsk:
    """The kind, mode, question and partial solution of a teacher prompt (orchestrator.teachers.teacher_messages);
    anything else raises UnreadablePrompt."""
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise UnreadablePrompt("no user message: expected the orchestrator's teacher prompt")
    content = _text(user[-1].get("content"))
    head, sep, rest = content.partition(_PARTIAL_OPEN)
    if not head.startswith(_PROMPT_HEAD) or not sep or _PARTIAL_CLOSE not in rest:
        raise UnreadablePrompt(
            "not a teacher prompt of the orchestrator (expected 'Question:', then 'Partial solution so far:' "
            "with the partial solution between <partial> tags)"
        )
    partial, _, instruction = rest.rpartition(_PARTIAL_CLOSE)
    for start, (kind, whole) in _INSTRUCTIONS.items():
        if instruction.startswith(start):  # a reference hint may follow (search.teacher_reference)
            return TeacherAsk(kind=kind, whole=whole, question=head[len(_PROMPT_HEAD) :], partial=partial)
    raise UnreadablePrompt("the instruction after the partial solution is none of the four teacher prompts")


# --- alignment -------------------------------------------------------------------------------------------------
def _values(text: str) -> list[float]:
    return [v for v in (number_value(m) for m in _NUMBER.findall(text)) if v is not None]


@dataclass
class _PartialLine:
    key: str  # the line for comparing text: notes removed, whitespace collapsed, lower case
    after_equals: list[float]  # the first number after each `=`
    line_end: float | None  # the line's last number


def partial_lines(partial: str) -> list[_PartialLine]:
    out = []
    for line in partial.split("\n"):
        if not line.strip():
            continue
        shown = _NOTE.sub("", line)
        after_equals = [v for piece in shown.split("=")[1:] for v in _values(piece)[:1]]
        ends = _values(shown)[-1:]
        out.append(_PartialLine(_line_key(line), after_equals, ends[0] if ends else None))
    return out


def _line_key(line: str) -> str:
    return " ".join(_NOTE.sub("", line).split()).lower()


def steps_done(reference: Reference, partial: str) -> int:
    """The number of reference steps the partial has done: 1 + the index of the last step done (0 when none).

    Steps are taken in order; each claims the first line of the partial not yet claimed that is the step as it
    is, or shows its result after an `=`, or ends in it (unless the number is also in the question). A line
    is claimed once, so two steps with the same result need two lines. Steps that compute nothing new ("Let S
    be the price.") are done only when written as they are."""
    lines = partial_lines(partial)
    claimed = [False] * len(lines)
    in_question = _values(reference.question)
    done = 0
    for i, step in enumerate(reference.steps):
        new_number = step.result is not None and not any(_same(step.result, v) for v in in_question)
        for j, line in enumerate(lines):
            if not claimed[j] and _shows(line, step, new_number):
                claimed[j], done = True, i + 1
                break
    return done


def _shows(line: _PartialLine, step: ReferenceStep, new_number: bool) -> bool:
    if line.key == _line_key(step.text):
        return True
    if step.result is None:
        return False
    if any(_same(step.result, v) for v in line.after_equals):
        return True
    return new_number and line.line_end is not None and _same(step.result, line.line_end)


# --- wrong steps -----------------------------------------------------------------------------------------------
_SYMBOLS = {"+": r"\+", "-": r"(?<=[\d\s)])-(?=[\s\d($])", "*": r"[*x×X]", "/": r"[/÷]"}
_SWAPS = {"+": ("-", "*"), "-": ("+",), "*": ("+", "/"), "/": ("*", "-")}


@dataclass
class _Line:
    """One solution line being rewritten: the text before its note, the note, and the text after it."""

    before: str
    expression: str | None  # the note's arithmetic, None for a line without a note
    after: str

    @classmethod
    def of(cls, raw: str) -> _Line:
        m = None
        for m in _NOTE.finditer(raw):
            pass
        if m is None or "=" not in m.group(1):
            return cls(before=raw, expression=None, after="")
        return cls(before=raw[: m.start()], expression=m.group(1).rsplit("=", 1)[0], after=raw[m.end() :])

    def shown(self, result: float | None) -> str:
        """The line as the student sees it, its result written as `result`."""
        if self.expression is None:
            return clean_reference(self.before)
        after = self.after
        if result is not None:
            after = _LEADING_NUMBER.sub(lambda m: m.group(1) + format_number(result), after, count=1)
        return clean_reference(self.before + after)


def _replace_last_number(text: str, old: float, new: float) -> str:
    """`text` with the last number worth `old` written as `new`."""
    for m in reversed(list(_NUMBER.finditer(text))):
        value = number_value(m.group())
        if value is not None and _same(value, old):
            prefix = "$" if "$" in m.group() else ""
            sign = "-" if new < 0 else ""
            return text[: m.start()] + sign + prefix + format_number(abs(new)) + text[m.end() :]
    return text


def _operands(expression: str) -> list[re.Match]:
    return list(re.finditer(r"\d+(?:\.\d+)?|\.\d+", expression))


def _slips(value: float, rng: random.Random) -> list[float]:
    """Plausible wrong values of a result: off by one or two, by ten, a power of ten, half or double, digits
    swapped; integers stay integers, positive stays positive."""
    out = [value + 1, value - 1, value + 2, value - 2, value + 10, value - 10, value * 10, value * 2]
    integral = abs(value - round(value)) < 1e-9
    if value / 10 == int(value / 10) or not integral:
        out.append(value / 10)
    if not integral or round(value) % 2 == 0:
        out.append(value / 2)
    digits = str(round(abs(value))) if integral else ""
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        out.append(float(digits[:-2] + digits[-1] + digits[-2]))
    keep = [v for v in out if not _same(v, value) and (v > 0 or value <= 0)]
    if integral:
        keep = [v for v in keep if abs(v - round(v)) < 1e-9]
    rng.shuffle(keep)
    return keep


def _misread(value: float) -> list[float]:
    out = [value + 1, value - 1, value * 2, value + 10]
    if value >= 20 and value % 10 == 0:
        out.append(value / 10)
    return [v for v in out if v > 0 and not _same(v, value)]


def wrong_step(step: ReferenceStep, rng: random.Random) -> tuple[str, float | None]:
    """One plausible wrong version of `step` and the (wrong) result it shows."""
    line = _Line.of(step.raw)
    kinds = ["slip", "operand", "operation"]
    rng.shuffle(kinds)
    if line.expression is not None:
        for kind in kinds:
            if kind == "operand":
                operands = _operands(line.expression)
                if not operands:
                    continue
                m = rng.choice(operands)
                old = float(m.group())
                choices = _misread(old)
                rng.shuffle(choices)
                for new in choices:
                    expression = (
                        line.expression[: m.start()] + format_number(new) + line.expression[m.end() :]
                    )
                    result = as_shown(evaluate(expression))
                    if result is None or step.result is None or _same(result, step.result) or result < 0:
                        continue
                    text = _Line(_replace_last_number(line.before, old, new), expression, line.after).shown(
                        result
                    )
                    return text, result
            elif kind == "operation":
                ops = [c for c in line.expression if c in "+-*/"]
                if len(ops) != 1 or step.result is None:  # which shown symbol goes with which is unclear
                    continue
                for new_op in _SWAPS[ops[0]]:
                    result = as_shown(evaluate(line.expression.replace(ops[0], new_op)))
                    if result is None or _same(result, step.result) or result < 0:
                        continue
                    shown = list(re.finditer(_SYMBOLS[ops[0]], line.before))
                    before = line.before
                    if shown:
                        m = shown[-1]
                        before = before[: m.start()] + {"*": "x"}.get(new_op, new_op) + before[m.end() :]
                    return _Line(before, line.expression, line.after).shown(result), result
    if step.result is not None:  # a slip in the result, written where the step shows it
        for new in _slips(step.result, rng):
            if line.expression is not None:
                return line.shown(new), new
            text = _replace_last_number(step.text, step.result, new)
            if text != step.text:
                return text, new
    return step.text, step.result


def carry_error(step: ReferenceStep, wrong: dict[float, float]) -> tuple[str, float | None]:
    """`step` recomputed with the earlier wrong results `wrong` (reference value -> wrong value) in place of the
    right ones: an error carried through the rest of a solution."""
    line = _Line.of(step.raw)
    if line.expression is None:
        text = step.text
        for old, new in wrong.items():
            text = _replace_last_number(text, old, new)
        result = step.result
        if result is not None:
            result = next((new for old, new in wrong.items() if _same(old, result)), result)
        return text, result
    expression, before = line.expression, line.before
    for m in reversed(_operands(line.expression)):
        value = float(m.group())
        new = next((n for old, n in wrong.items() if _same(old, value)), None)
        if new is not None:
            expression = expression[: m.start()] + format_number(new) + expression[m.end() :]
            before = _replace_last_number(before, value, new)
    result = as_shown(evaluate(expression)) if expression != line.expression else step.result
    if result is None:
        return step.text, step.result
    return _Line(before, expression, line.after).shown(result), result


def wrong_answer(reference: Reference, wrong: dict[float, float], rng: random.Random) -> str:
    gold = number_value(reference.answer)
    if gold is None:
        return reference.answer_line
    carried = next((new for old, new in wrong.items() if _same(old, gold)), None)
    if carried is None or _same(carried, gold):
        carried = _slips(gold, rng)[0]
    return f"#### {format_number(carried)}"


# --- writing ---------------------------------------------------------------------------------------------------
def right_text(reference: Reference, done: int, whole: bool) -> str:
    rest = [s.text for s in reference.steps[done:]] + [reference.answer_line]
    return "\n".join(rest) if whole else rest[0]


def wrong_text(reference: Reference, done: int, whole: bool, rng: random.Random) -> str:
    """A wrong next step (or, `whole`, a wrong rest of the solution). A step with nothing to get wrong ("Let S
    be the price.") is written as it is and the mistake goes into the first step after it that has one."""
    steps = reference.steps
    kept: list[str] = []
    for at in range(done, len(steps)):
        text, result = wrong_step(steps[at], rng)
        if text != steps[at].text:
            break
        kept.append(steps[at].text)
    else:
        return (
            "\n".join(kept + [wrong_answer(reference, {}, rng)])
            if whole
            else wrong_answer(reference, {}, rng)
        )
    if not whole:
        return text
    step = steps[at]
    wrong = {step.result: result} if step.result is not None and result is not None else {}
    lines = kept + [text]
    for later in steps[at + 1 :]:
        text, result = carry_error(later, wrong)
        lines.append(text)
        if later.result is not None and result is not None and not _same(later.result, result):
            wrong[later.result] = result
    return "\n".join(lines + [wrong_answer(reference, wrong, rng)])


def _rng(seed: int | None, index: int, attempt: int, ask: TeacherAsk) -> random.Random:
    if seed is None:
        return random.Random()
    digest = hashlib.blake2b(
        f"{seed}|{index}|{attempt}|{question_key(ask.question)}|{ask.partial}".encode(), digest_size=8
    ).digest()
    return random.Random(int.from_bytes(digest, "big"))


def write(reference: Reference, ask: TeacherAsk, n: int, seed: int | None) -> list[str]:
    """The n texts of a teacher request (before max_tokens and stop)."""
    done = steps_done(reference, ask.partial)
    if ask.kind == "right":
        return [right_text(reference, done, ask.whole)] * n
    texts: list[str] = []
    for index in range(n):
        for attempt in range(16):  # the n choices differ where the step has that many wrong versions
            text = wrong_text(reference, done, ask.whole, _rng(seed, index, attempt, ask))
            if text not in texts:
                break
        texts.append(text)
    return texts


# --- tokens ----------------------------------------------------------------------------------------------------
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
            return [tuple(o) for o in self.tokenizer.encode(text, add_special_tokens=False).offsets]
        return [m.span() for m in _PIECE.finditer(text)]

    def count(self, text: str) -> int:
        return len(self.spans(text))

    def cut(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """The first `max_tokens` tokens of `text`, and whether anything was cut."""
        spans = self.spans(text)
        if len(spans) <= max_tokens:
            return text, False
        return (text[: spans[max_tokens - 1][1]] if max_tokens > 0 else ""), True


# --- the engine ------------------------------------------------------------------------------------------------
@dataclass
class Choice:
    text: str
    finish_reason: Literal["stop", "length"]
    stop_reason: str | None  # the stop string that cut the text; None when it ended by itself (or by length)


@dataclass
class Reply:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    ask: TeacherAsk


@dataclass
class Counters:
    requests: int = 0
    choices: int = 0
    completion_tokens: int = 0
    unknown_questions: int = 0
    unreadable_prompts: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)


class ReferenceTeacher:
    """Answers teacher prompts from the reference solutions; no HTTP here."""

    def __init__(self, book: ReferenceBook, tokens: TokenCounter | None = None, model: str = "reference"):
        self.book, self.tokens, self.model = book, tokens or TokenCounter(), model
        self.counters = Counters()

    def chat(
        self,
        messages: list[dict],
        n: int = 1,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Reply:
        try:
            ask = read_teacher_prompt(messages)
            reference = self.book.find(ask.question)
        except UnknownQuestion:
            self.counters.unknown_questions += 1
            raise
        except UnreadablePrompt:
            self.counters.unreadable_prompts += 1
            raise
        choices = [self._finish(text, max_tokens, stop or []) for text in write(reference, ask, n, seed)]
        completion_tokens = sum(self.tokens.count(c.text) for c in choices)
        prompt_tokens = sum(self.tokens.count(_text(m.get("content"))) for m in messages)
        mode = f"{ask.kind}_{'whole' if ask.whole else 'line'}"
        c = self.counters
        c.requests += 1
        c.choices += n
        c.completion_tokens += completion_tokens
        c.by_mode[mode] = c.by_mode.get(mode, 0) + 1
        return Reply(choices, prompt_tokens, completion_tokens, ask)

    def _finish(self, text: str, max_tokens: int | None, stop: list[str]) -> Choice:
        cut_at, stop_reason = len(text), None
        for s in stop:
            at = text.find(s)
            if 0 <= at < cut_at:
                cut_at, stop_reason = at, s
        text = text[:cut_at]
        if max_tokens is not None:
            text, cut = self.tokens.cut(text, max_tokens)
            if cut:
                return Choice(text, "length", None)
        return Choice(text, "stop", stop_reason)


# --- HTTP --------------------------------------------------------------------------------------------------------
class ReferenceTeacherSettings(BaseSettings):
    """REFERENCE_TEACHER_* environment variables; the GSM8K folder is GSM8K_PATH, as for the other services."""

    model_config = SettingsConfigDict(env_prefix="REFERENCE_TEACHER_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8010
    model_name: str = "reference"
    tokenizer: str | None = None  # a tokenizer.json: usage counted in that model's tokens
    gsm8k_path: str | None = Field(
        default=None, validation_alias=AliasChoices("REFERENCE_TEACHER_GSM8K_PATH", "GSM8K_PATH")
    )


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = ""


class ChatRequestIn(BaseModel):
    """The OpenAI chat fields this server reads; others (user, presence_penalty, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)  # accepted, no effect
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}, "detail": message}
    return JSONResponse(status_code=status, content=body)


def create_app(settings: ReferenceTeacherSettings | None = None, teacher: ReferenceTeacher | None = None):
    """The FastAPI app; the reference solutions load when it is built (7,473 problems, well under a second)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ReferenceTeacherSettings()
    if teacher is None:
        teacher = ReferenceTeacher(
            ReferenceBook.from_gsm8k(settings.gsm8k_path),
            TokenCounter(settings.tokenizer),
            settings.model_name,
        )
    started = time.time()
    app = FastAPI(title="alphazero-llm-trainer: reference teacher")
    app.state.teacher = teacher

    @app.exception_handler(ReferenceTeacherError)
    async def refused(_: Request, exc: ReferenceTeacherError):
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        fields = [".".join(str(p) for p in e["loc"] if p != "body") for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields[:20], errors))
        return _error(422, message, fields[0] if fields else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        c = teacher.counters
        return {
            "status": "ok",
            "model": teacher.model,
            "problems": len(teacher.book),
            "requests": c.requests,
            "choices": c.choices,
            "completion_tokens": c.completion_tokens,
            "unknown_questions": c.unknown_questions,
            "unreadable_prompts": c.unreadable_prompts,
            "by_mode": dict(c.by_mode),
            "tokens": "tokenizer" if teacher.tokens.tokenizer is not None else "word pieces",
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": teacher.model, "object": "model", "created": int(started), "owned_by": "reference"}
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequestIn):
        if req.model != teacher.model:
            raise UnknownModel(
                f"model {req.model!r} is not served here; this server serves {teacher.model!r}"
            )
        if req.stream:
            raise Unsupported("streaming is not supported by the reference teacher")
        if req.logprobs:
            raise Unsupported(
                "log-probs are not available: the reference teacher has no model to take them from"
            )
        reply = teacher.chat(
            [m.model_dump() for m in req.messages],
            n=req.n,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            stop=req.stop,
            seed=req.seed,
        )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": teacher.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "logprobs": None,
                }
                for i, c in enumerate(reply.choices)
            ],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
        }

    return app


def service_process(
    port: int,
    log_path: Path,
    gsm8k_path: str | None = None,
    tokenizer: str | None = None,
    cwd: str | Path | None = None,
):
    """The reference teacher as a process on 127.0.0.1 (orchestrator.processes.ServiceProcess: start, wait_ready,
    stop), for the bench and the tests."""
    from orchestrator.processes import ServiceProcess

    env = {"REFERENCE_TEACHER_HOST": "127.0.0.1", "REFERENCE_TEACHER_PORT": str(port)}
    if gsm8k_path:
        env["GSM8K_PATH"] = gsm8k_path
    if tokenizer:
        env["REFERENCE_TEACHER_TOKENIZER"] = tokenizer
    return ServiceProcess(
        "reference-teacher",
        ["-m", "orchestrator.reference_teacher"],
        env,
        Path(log_path),
        f"http://127.0.0.1:{port}",
        cwd=cwd,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="The reference teacher: GSM8K train reference solutions over the OpenAI chat API."
    )
    p.add_argument("--host", default=None, help="default REFERENCE_TEACHER_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default REFERENCE_TEACHER_PORT or 8010")
    p.add_argument(
        "--gsm8k", default=None, help="GSM8K folder with train.jsonl (default GSM8K_PATH, else the hub)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="a tokenizer.json to count usage in (default: word pieces)"
    )
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "gsm8k_path": args.gsm8k,
            "tokenizer": args.tokenizer,
        }.items()
        if v is not None
    }
    settings = ReferenceTeacherSettings(**overrides)
    if settings.tokenizer and not Path(settings.tokenizer).is_file():
        p.error(f"--tokenizer {settings.tokenizer}: no such file")
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
