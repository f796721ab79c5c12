"""Plausible wrong steps: an arithmetic slip, a misread operand or a wrong operation, and an error carried through
the rest of a solution."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from orchestrator.reference_teacher.arithmetic import (
    LEADING_NUMBER,
    NOTE,
    NUMBER,
    as_shown,
    evaluate,
    format_number,
    number_value,
    same,
)
from orchestrator.reference_teacher.references import Reference, ReferenceStep
from orchestrator.search.teachers import clean_reference

_SYMBOLS = {"+": r"\+", "-": r"(?<=[\d\s)])-(?=[\s\d($])", "*": r"[*xX\u00d7]", "/": r"[/\u00f7]"}
_SWAPS = {"+": ("-", "*"), "-": ("+",), "*": ("+", "/"), "/": ("*", "-")}


@dataclass
class _Line:
    """One solution line being rewritten: the text before its note, the note, and the text after it."""

    before: str
    expression: str | None  # the note's arithmetic, None for a line without a note
    after: str

    @classmethod
    def of(cls, raw: str) -> _Line:
        notes = list(NOTE.finditer(raw))
        m = notes[-1] if notes else None  # the step's result is its last note's
        if m is None or "=" not in m.group(1):
            return cls(before=raw, expression=None, after="")
        return cls(before=raw[: m.start()], expression=m.group(1).rsplit("=", 1)[0], after=raw[m.end() :])

    def shown(self, result: float | None) -> str:
        """The line as the student sees it, its result written as `result`."""
        if self.expression is None:
            return clean_reference(self.before)
        after = self.after
        if result is not None:
            after = LEADING_NUMBER.sub(lambda m: m.group(1) + format_number(result), after, count=1)
        return clean_reference(self.before + after)


def _replace_last_number(text: str, old: float, new: float) -> str:
    """`text` with the last number worth `old` written as `new`."""
    for m in reversed(list(NUMBER.finditer(text))):
        value = number_value(m.group())
        if value is not None and same(value, old):
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
    keep = [v for v in out if not same(v, value) and (v > 0 or value <= 0)]
    if integral:
        keep = [v for v in keep if abs(v - round(v)) < 1e-9]
    rng.shuffle(keep)
    return keep


def _misread(value: float) -> list[float]:
    out = [value + 1, value - 1, value * 2, value + 10]
    if value >= 20 and value % 10 == 0:
        out.append(value / 10)
    return [v for v in out if v > 0 and not same(v, value)]


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
                    if result is None or step.result is None or same(result, step.result) or result < 0:
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
                    if result is None or same(result, step.result) or result < 0:
                        continue
                    shown = list(re.finditer(_SYMBOLS[ops[0]], line.before))
                    before = line.before
                    if shown:
                        m = shown[-1]
                        symbol = "x" if new_op == "*" else new_op  # GSM8K lines write products with x
                        before = before[: m.start()] + symbol + before[m.end() :]
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
            result = next((new for old, new in wrong.items() if same(old, result)), result)
        return text, result
    expression, before = line.expression, line.before
    for m in reversed(_operands(line.expression)):
        value = float(m.group())
        new = next((n for old, n in wrong.items() if same(old, value)), None)
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
    carried = next((new for old, new in wrong.items() if same(old, gold)), None)
    if carried is None or same(carried, gold):
        carried = _slips(gold, rng)[0]
    return f"#### {format_number(carried)}"
