"""Request models of the trainer's HTTP API (OpenAI wire format plus /logprobs, /grpo/step, /checkpoints).

Field-level checks live here, so a bad request fails with 422 naming the field before anything runs; checks that
need the tokenizer (prompt length against the context) are made by the engine and answered with 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelName = Literal["student", "base"]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# Lists stop at their first bad element: otherwise one error per element, and a 29 MiB body of 1.6 M bad items cost
# 18 s, 1.8 GiB and a 175 MiB answer (tests/integration/test_fuzz_api.py).
_FAIL_FAST = Field(fail_fast=True)


class _Request(BaseModel):
    # OpenAI clients send fields this server does not use (user, presence_penalty=0, ...): accept and ignore.
    model_config = ConfigDict(extra="ignore")


class _SamplingRequest(_Request):
    """What /v1/completions and /v1/chat/completions share: the model and how to sample from it."""

    model: ModelName
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=64)
    stop: str | Annotated[list[str], _FAIL_FAST] | None = Field(default=None, validate_default=True)  # -> list[str]
    seed: int | None = None
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, value: bool) -> bool:
        if value:
            raise ValueError("streaming is not supported by this server")
        return value


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], _FAIL_FAST]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(p == "" for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[dict[str, Any]], _FAIL_FAST] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text parts are meaningful here
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], _FAIL_FAST] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _continue_needs_assistant(self):
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message: the last message must have role 'assistant'")
        return self


class _Forbid(BaseModel):
    """Unknown fields are errors; past a few, one error for all of them (not one per key of a huge object)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _many_unknown_at_once(cls, data):
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + 16:
            unknown = [k for k in data if k not in cls.model_fields]
            raise ValueError(f"{len(unknown)} unknown fields, e.g. {unknown[:3]}")
        return data


class _PromptItem(_Forbid):
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], _FAIL_FAST] | None = None
    context: str = ""
    completion: str

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt, messages: give exactly one of them")
        if self.messages is not None and not self.messages:
            raise ValueError("messages: must not be empty")
        return self


class LogprobsItem(_PromptItem):
    pass


class LogprobsRequest(_Request):
    model: ModelName = "student"
    items: Annotated[list[LogprobsItem], _FAIL_FAST] = Field(min_length=1)


class GrpoItemIn(_PromptItem):
    completion: str = Field(min_length=1)
    advantage: FiniteFloat
    old_logprobs: Annotated[list[FiniteFloat], _FAIL_FAST] | None = None
    weight: FiniteFloat = Field(default=1.0, ge=0.0)


class LossIn(_Forbid):
    type: Literal["grpo", "dr_grpo", "legacy"] = "grpo"
    beta: FiniteFloat = Field(default=0.04, ge=0.0)
    clip_eps: FiniteFloat = Field(default=0.2, gt=0.0, lt=1.0)
    clip_eps_high: FiniteFloat | None = Field(default=None, gt=0.0)
    max_grad_norm: FiniteFloat = Field(default=1.0, gt=0.0)
    micro_batch_size: int = Field(default=8, ge=1, le=1024)
    learning_rate: FiniteFloat | None = Field(default=None, gt=0.0, le=1.0)  # 1e300 overflowed inside AdamW
    max_length: int | None = Field(default=None, ge=1)


class GrpoStepRequest(_Request):
    items: Annotated[list[GrpoItemIn], _FAIL_FAST] = Field(min_length=1)
    loss: LossIn = Field(default_factory=LossIn)
    step_key: str | None = Field(default=None, max_length=256)


class SaveCheckpointRequest(_Request):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LoadCheckpointRequest(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
