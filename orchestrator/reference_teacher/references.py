"""The GSM8K train reference solutions, step by step, found by their question."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.gsm8k.data import Problem, load_gsm8k
from orchestrator.reference_teacher.arithmetic import NOTE, NUMBER, number_value
from orchestrator.reference_teacher.errors import UnknownQuestion
from orchestrator.search.teachers import clean_reference


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
    notes = NOTE.findall(raw)
    result = None
    if notes and "=" in notes[-1]:
        result = number_value(notes[-1].rsplit("=", 1)[1])
    if result is None:
        numbers = NUMBER.findall(NOTE.sub("", raw))
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
