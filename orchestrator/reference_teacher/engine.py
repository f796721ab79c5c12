"""One teacher request end to end (read, look up, write, cut, count), and the counters /health reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from orchestrator.reference_teacher.errors import UnknownQuestion, UnreadablePrompt
from orchestrator.reference_teacher.prompts import TeacherAsk, message_text, read_teacher_prompt
from orchestrator.reference_teacher.references import ReferenceBook
from orchestrator.reference_teacher.tokens import TokenCounter
from orchestrator.reference_teacher.writing import write


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
        prompt_tokens = sum(self.tokens.count(message_text(m.get("content"))) for m in messages)
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
