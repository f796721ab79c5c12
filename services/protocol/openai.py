"""The OpenAI-compatible part of the trainer's API: /v1/models, /v1/completions and /v1/chat/completions as the
trainer serves them (vLLM's wire format, plus the adapter version that produced each response).

Field-level checks live here, so a bad request fails with 422 naming the field before anything runs; checks that
need the tokenizer (prompt length against the context) are the trainer's, answered with 400. At the end, the
lenient Received* models: what the orchestrator's client reads from any OpenAI-compatible server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict

from .common import FAIL_FAST, LenientModel, LenientRequest, ModelName, OneOrMoreTexts

FinishReason = Literal["stop", "length"]


# ----- requests -----
class StreamOptions(LenientRequest):
    include_usage: bool = Field(
        default=False, description="a last chunk, before data: [DONE], with no choices and the usage"
    )


class SamplingRequest(LenientRequest):
    """What /v1/completions and /v1/chat/completions share: the model and how to sample from it."""

    model: ModelName
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=64, description="samples per prompt")
    stop: OneOrMoreTexts | None = Field(
        default=None, validate_default=True, description="stop strings; normalised to a list"
    )
    seed: int | None = Field(
        default=None, description="the same seed gives the same text, whatever shares the batch"
    )
    stream: bool = Field(
        default=False,
        description="answer with server-sent events as the tokens are decoded: `data: <chunk JSON>` lines in "
        "OpenAI's chunk format, then `data: [DONE]`",
    )
    stream_options: StreamOptions | None = Field(default=None, description="with stream only")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_strings(self) -> list[str]:
        """`stop` after validation (always a list)."""
        return list(self.stop or [])


class CompletionRequest(SamplingRequest):
    prompt: OneOrMoreTexts = Field(
        description="a non-empty string, or a non-empty list of them (each answered n times)"
    )
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="the sampled token's log-prob plus this many alternatives"
    )
    echo: bool = Field(default=False, description="the prompt is repeated before the completion")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[dict[str, Any]], FAIL_FAST] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text parts are meaningful here
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


# continue_final_message continues the last message, which must be the assistant's, after at least one other (the
# continued text follows the template's rendering of the messages before it). JSON Schema can say "at least two";
# "the last one is the assistant's" it cannot, so the field's description says it.
_CONTINUE_NEEDS_TWO: JsonDict = {
    "if": {"properties": {"continue_final_message": {"const": True}}, "required": ["continue_final_message"]},
    "then": {"properties": {"messages": {"minItems": 2}}},
}


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra=_CONTINUE_NEEDS_TWO)

    messages: Annotated[list[ChatMessage], FAIL_FAST] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="wins over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(
        default=False,
        description="continue the last message instead of starting a new one; then `messages` holds at least two "
        "and the last is the assistant's (else 422)",
    )

    @model_validator(mode="after")
    def _continue_needs_assistant(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message: the last message must have role 'assistant'")
        return self


# ----- responses -----
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(
        description="tokens generated, each sample's end-of-sequence token included"
    )
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions' log-probs, one entry per token (the prompt's first, with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(
        description="None for the first prompt token (nothing predicts it)"
    )
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt index x n + sample index")
    text: str
    finish_reason: FinishReason
    stop_reason: str | None = Field(description="the stop string that ended the sample, as vLLM reports it")
    logprobs: CompletionLogprobs | None


class _Response(BaseModel):
    id: str
    created: int
    model: ModelName
    usage: Usage
    adapter_version: int = Field(description="the adapter version that produced every choice")


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    stop_reason: str | None
    logprobs: ChatLogprobs | None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


# ----- streamed responses (stream: true): one chunk per `data:` line -----
class CompletionChunkChoice(BaseModel):
    index: int = Field(description="prompt index x n + sample index")
    text: str = Field(description="the text decoded since the last chunk of this choice")
    logprobs: CompletionLogprobs | None = Field(default=None, description="of this chunk's tokens")
    finish_reason: FinishReason | None = Field(default=None, description="set in the choice's last chunk")
    stop_reason: str | None = None


class CompletionChunk(BaseModel):
    id: str = Field(description="the same in every chunk of a response")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: ModelName
    choices: list[CompletionChunkChoice] = Field(description="empty in the usage chunk")
    usage: Usage | None = Field(
        default=None, description="in the last chunk, with stream_options.include_usage"
    )
    adapter_version: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, description="in the first chunk of a choice")
    content: str | None = Field(default=None, description="the text decoded since the last chunk")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = Field(default=None, description="of this chunk's tokens")
    finish_reason: FinishReason | None = Field(default=None, description="set in the choice's last chunk")
    stop_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str = Field(description="the same in every chunk of a response")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: ModelName
    choices: list[ChatChunkChoice] = Field(description="empty in the usage chunk")
    usage: Usage | None = Field(
        default=None, description="in the last chunk, with stream_options.include_usage"
    )
    adapter_version: int


class ModelCard(BaseModel):
    id: ModelName
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alphazero-llm-trainer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- what a client reads from any OpenAI-compatible server (vLLM, OpenRouter, this trainer) -----
# Only the fields the orchestrator uses, optional where some server leaves them out; every other field (vLLM's
# prompt_logprobs, OpenRouter's provider, ...) is ignored. The trainer's own answers above are a strict subset.
class ReceivedTokenLogprob(LenientModel):
    logprob: float
    token: str | None = Field(default=None, description="the sampled token's text (the fork search's lines)")


class ReceivedChatLogprobs(LenientModel):
    content: list[ReceivedTokenLogprob] | None = None


class ReceivedCompletionLogprobs(LenientModel):
    token_logprobs: list[float | None] | None = None
    tokens: list[str] | None = None


class ReceivedMessage(LenientModel):
    content: str | None = None


class _ReceivedChoice(LenientModel):
    index: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = Field(
        default=None, description="vLLM: the stop string (or token id) that ended it; null = end of sequence"
    )
    token_ids: list[int] | None = Field(
        default=None,
        description="vLLM with return_token_ids: the sampled token ids, end of sequence included",
    )


class ReceivedCompletionChoice(_ReceivedChoice):
    text: str | None = None
    logprobs: ReceivedCompletionLogprobs | None = None


class ReceivedChatChoice(_ReceivedChoice):
    message: ReceivedMessage | None = None
    logprobs: ReceivedChatLogprobs | None = None


class _Received(LenientModel):
    usage: dict[str, Any] | None = None
    adapter_version: int | None = Field(default=None, description="the trainer's; other servers have none")


class ReceivedCompletion(_Received):
    choices: list[ReceivedCompletionChoice]


class ReceivedChatCompletion(_Received):
    choices: list[ReceivedChatChoice]
