"""Errors the trainer answers with, each raised with its kind: the HTTP status it maps to, the OpenAI error type,
and the request field it concerns. The HTTP layer turns any TrainerError into the error body as it is; nothing
reads an error's text to learn what it was.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base of the errors the trainer answers; `str(error)` is the message clients read."""

    status: int = 500

    def __init__(self, message: str, *, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status

    @property
    def kind(self) -> str:
        """OpenAI's error `type`: the client's to fix (4xx) or the server's (5xx)."""
        return "invalid_request_error" if self.status < 500 else "server_error"

    def __reduce__(self) -> tuple:
        # Pickled as class, message and fields, not by calling __init__ again (the subclasses' own signatures
        # differ): an error raised in the engine process reaches the route as the same class, status and field.
        return (_rebuild_error, (type(self), self.message, dict(self.__dict__)))


def _rebuild_error(cls: type[TrainerError], message: str, fields: dict) -> TrainerError:
    error = cls.__new__(cls)
    error.args = (message,)
    error.__dict__.update(fields)
    return error


class InvalidRequest(TrainerError, ValueError):
    """The request cannot be served as given (400; 422 where the field check belongs with validation).

    The message reads "<field>: <why>" so that it names the field, as pydantic's messages do."""

    status = 400

    def __init__(self, field: str, why: str, *, status: int = 400):
        super().__init__(f"{field}: {why}", field=field, status=status)
        self.why = why


class NotFiniteStep(TrainerError, FloatingPointError):
    """A GRPO step whose loss or gradient overflowed (e.g. advantage 1e16 or weight 1e308): nothing was applied,
    and the numbers came from the request, so it is the client's to fix (422 on `items`)."""

    status = 422

    def __init__(self, what: str):
        super().__init__(
            f"{what}; the step was not applied (are advantages or weights too large?)", field="items"
        )


class NotReady(TrainerError):
    """The model is still loading, or failed to load (503)."""

    status = 503

    def __init__(self, reason: str | None):
        super().__init__(f"model failed to load: {reason}" if reason else "model is loading")
        self.reason = reason


class EngineStopped(TrainerError):
    """The engine process (TRAINER_ENGINE_PROCESS) exited or was killed: requests it held fail with this, and so
    does every request after it (503; /health says why)."""

    status = 503

    def __init__(self, reason: str):
        super().__init__(f"the engine process stopped: {reason}")
        self.reason = reason
