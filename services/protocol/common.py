"""What every model of the trainer's protocol shares: how unknown fields are treated and the value types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelName = Literal["student", "base"]
"""Which weights answer: "student" = the current LoRA adapter, "base" = the same model with the adapter off."""

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

# Lists stop at their first bad element: otherwise one error per element, and a 29 MiB body of 1.6 M bad items cost
# 18 s, 1.8 GiB and a 175 MiB answer (tests/integration/test_fuzz_api.py).
FAIL_FAST = Field(fail_fast=True)


class LenientModel(BaseModel):
    """A request in the OpenAI style: fields this server does not use (user, presence_penalty=0, ...) are accepted
    and ignored, as OpenAI clients send them."""

    model_config = ConfigDict(extra="ignore")


class StrictModel(BaseModel):
    """Unknown fields are errors; past a few, one error for all of them (not one per key of a huge object)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _many_unknown_at_once(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + 16:
            unknown = [k for k in data if k not in cls.model_fields]
            raise ValueError(f"{len(unknown)} unknown fields, e.g. {unknown[:3]}")
        return data
