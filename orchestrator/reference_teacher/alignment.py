"""How far a partial solution got along the reference: the number of reference steps it has done."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.reference_teacher.arithmetic import NOTE, same, values
from orchestrator.reference_teacher.references import Reference, ReferenceStep


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
        shown = NOTE.sub("", line)
        after_equals = [v for piece in shown.split("=")[1:] for v in values(piece)[:1]]
        ends = values(shown)[-1:]
        out.append(_PartialLine(_line_key(line), after_equals, ends[0] if ends else None))
    return out


def _line_key(line: str) -> str:
    return " ".join(NOTE.sub("", line).split()).lower()


def steps_done(reference: Reference, partial: str) -> int:
    """The number of reference steps the partial has done: 1 + the index of the last step done (0 when none).

    Steps are taken in order; each claims the first line of the partial not yet claimed that is the step as it
    is, or shows its result after an `=`, or ends in it (unless the number is also in the question). A line
    is claimed once, so two steps with the same result need two lines. Steps that compute nothing new ("Let S
    be the price.") are done only when written as they are."""
    lines = partial_lines(partial)
    claimed = [False] * len(lines)
    in_question = values(reference.question)
    done = 0
    for i, step in enumerate(reference.steps):
        new_number = step.result is not None and not any(same(step.result, v) for v in in_question)
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
    if any(same(step.result, v) for v in line.after_equals):
        return True
    return new_number and line.line_end is not None and same(step.result, line.line_end)
