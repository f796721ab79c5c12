"""Reading the orchestrator's teacher prompts (orchestrator/search/teachers.py): kind, mode, question, partial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.reference_teacher.errors import UnreadablePrompt
from orchestrator.search.teachers import RIGHT_PROMPT, RIGHT_WHOLE_PROMPT, WRONG_PROMPT, WRONG_WHOLE_PROMPT

Kind = Literal["right", "wrong"]


@dataclass(frozen=True)
class TeacherAsk:
    kind: Kind
    whole: bool
    question: str
    partial: str


_PROMPT_HEAD = "Question:\n"
_PARTIAL_OPEN = "\n\nPartial solution so far:\n<partial>\n"
_PARTIAL_CLOSE = "</partial>\n\n"
# The instruction after the partial solution says which teacher is asked (teachers.py's four templates).
_MODES: list[tuple[str, Kind, bool]] = [
    (RIGHT_PROMPT, "right", False),
    (WRONG_PROMPT, "wrong", False),
    (RIGHT_WHOLE_PROMPT, "right", True),
    (WRONG_WHOLE_PROMPT, "wrong", True),
]
_INSTRUCTIONS: dict[str, tuple[Kind, bool]] = {
    template.split(_PARTIAL_CLOSE, 1)[1]: (kind, whole) for template, kind, whole in _MODES
}


def message_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def read_teacher_prompt(messages: list[dict]) -> TeacherAsk:
    """The kind, mode, question and partial solution of a teacher prompt (orchestrator.search.teachers.teacher_messages);
    anything else raises UnreadablePrompt."""
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise UnreadablePrompt("no user message: expected the orchestrator's teacher prompt")
    content = message_text(user[-1].get("content"))
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
