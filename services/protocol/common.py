"""What every model of the trainer's protocol shares: how unknown fields are treated and the value types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

ModelName = Literal["student", "base"]
"""Which weights answer: "student" = the current LoRA adapter, "base" = the same model with the adapter off."""

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

# Lists stop at their first bad element: otherwise one error per element, and a 29 MiB body of 1.6 M bad items cost
# 18 s, 1.8 GiB and a 175 MiB answer (tests/integration/test_fuzz_api.py).
FAIL_FAST = Field(fail_fast=True)


NonEmptyStr = Annotated[str, Field(min_length=1)]


def _one_or_many(value: Any) -> str:
    return "<many>" if isinstance(value, list) else "<one>"


# A string or a non-empty list of them, as OpenAI's `prompt` and `stop` are. Only the branch the value's shape picks
# is validated, so an error names the value (or the list element) itself; the branch shows in an error's loc as
# "<one>" or "<many>", which error messages leave out (is_branch_tag).
OneOrMoreTexts = Annotated[
    Annotated[NonEmptyStr, Tag("<one>")]
    | Annotated[list[NonEmptyStr], FAIL_FAST, Field(min_length=1), Tag("<many>")],
    Discriminator(_one_or_many),
]


def is_branch_tag(part: Any) -> bool:
    """A loc part that names a union branch (one_or_many's "<one>"/"<many>"), not a field."""
    return isinstance(part, str) and part.startswith("<") and part.endswith(">")


class LenientModel(BaseModel):
    """Fields this side does not use are accepted and ignored: what a client reads from other servers (their
    extras), and the base of OpenAI-style requests (clients send user, presence_penalty=0, ...)."""

    model_config = ConfigDict(extra="ignore")


class LenientRequest(LenientModel):
    """A request body in the OpenAI style (the trainer's routes): unknown fields ignored, known ones strictly of
    their schema's type (the wire says integer: 1.0 is refused; boolean: 0 is refused), so what the OpenAPI schema
    promises is what the service accepts."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StrictModel(BaseModel):
    """A request body of this project's own: unknown fields are errors (past a few, one error for all of them, not
    one per key of a huge object), and values are strictly of their schema's type (no 1.0 for an integer, no 0
    for a boolean)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _many_unknown_at_once(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + 16:
            unknown = [k for k in data if k not in cls.model_fields]
            raise ValueError(f"{len(unknown)} unknown fields, e.g. {unknown[:3]}")
        return data
