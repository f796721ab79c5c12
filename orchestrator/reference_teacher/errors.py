"""The reference teacher's refusals; each carries the HTTP status it stands for."""

from __future__ import annotations


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
