"""The trainer's own routes for learning: /logprobs (score completions) and /grpo/step (one GRPO update), with the
one definition of the loss settings that both the trainer and the orchestrator's /train accept."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from .common import FAIL_FAST, FiniteFloat, LenientRequest, ModelName, StrictModel
from .openai import ChatMessage

LossType = Literal["grpo", "dr_grpo", "legacy"]
# A sanity bound on optimizer steps per /grpo/step: GRPO runs use 1-4 (mu, or TRL's steps_per_generation over
# gradient_accumulation_steps); far more re-fits one batch of samples until the clip masks every token.
MAX_UPDATES = 16


class LossSettings(StrictModel):
    """How one GRPO step turns its items into an update (services/trainer/grpo.py has the maths).

    The bounds are the ones the step can honour: the clipped ratio's lower end 1 - clip_eps must stay positive,
    and a learning rate of 1e300 overflowed inside AdamW. The caps on beta and clip_eps_high (10) are sanity
    bounds: a KL weight above 10 drowns the policy term, and a ratio allowed up to 11 is no clip at all; so is
    the cap on updates (MAX_UPDATES). No cap on max_grad_norm: any finite norm is a meaningful threshold, and a
    huge one means "do not clip".
    """

    type: LossType = Field(
        default="grpo",
        description="grpo: per-sequence token mean; dr_grpo: token sum over a constant length; "
        "legacy: reward-weighted SFT (an ablation)",
    )
    beta: FiniteFloat = Field(
        default=0.04, ge=0.0, le=10.0, description="weight of the KL penalty to the base model"
    )
    clip_eps: FiniteFloat = Field(
        default=0.2, gt=0.0, lt=1.0, description="PPO clip range below (and above) 1"
    )
    clip_eps_high: FiniteFloat | None = Field(
        default=None, gt=0.0, le=10.0, description="clip range above 1 (DAPO's clip-higher); None = clip_eps"
    )
    max_grad_norm: FiniteFloat = Field(
        default=1.0, gt=0.0, description="the gradient is clipped to this norm"
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="sequences per forward/backward pass; None = as many as fit the trainer's token budget "
        "(TRAINER_MICRO_BATCH_TOKENS: padded tokens per pass)",
    )
    learning_rate: FiniteFloat | None = Field(
        default=None, gt=0.0, le=1.0, description="this step's learning rate; None = TRAINER_LEARNING_RATE"
    )
    max_length: int | None = Field(
        default=None, ge=1, description="dr_grpo's constant length; None = the longest completion of the step"
    )
    is_cap: FiniteFloat = Field(
        default=2.0,
        ge=1.0,
        description="truncation C of the importance weight min(pi_old/mu, C) of tokens that carry "
        "sampler_logprobs (TRL's vllm_importance_sampling_cap: 2.0 with per-token truncation, its first mode; "
        "3.0 with its later per-sequence masking)",
    )
    updates: int = Field(
        default=1,
        ge=1,
        le=MAX_UPDATES,
        description="optimizer steps this /grpo/step makes over its items (GRPO's mini-batches per generation: "
        "TRL's steps_per_generation / gradient_accumulation_steps): the items, shuffled with the step number as "
        "seed and each prompt's items kept together where the cut allows, are cut into this many mini-batches "
        "of near-equal size, each one update; PPO's old policy is the adapter before the first of them. The "
        "adapter version still goes up by one per /grpo/step",
    )


# Exactly one of prompt and messages, as JSON Schema says it (the other absent or null).
_ONE_PROMPT: JsonDict = {
    "oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]
}


class PromptedItem(StrictModel):
    """A completion and what it follows: a prompt string or chat messages (rendered with the chat template),
    exactly one of them, then `context` (text between the prompt and the completion, e.g. earlier reasoning
    steps)."""

    model_config = ConfigDict(json_schema_extra=_ONE_PROMPT)

    prompt: str | None = Field(default=None, description="give this or messages")
    messages: Annotated[list[ChatMessage], FAIL_FAST, Field(min_length=1)] | None = Field(
        default=None, description="give this or prompt"
    )
    context: str = ""
    completion: str
    completion_ids: Annotated[list[Annotated[int, Field(ge=0)]], FAIL_FAST] | None = Field(
        default=None,
        min_length=1,
        description="the completion's token ids as the sampler produced them; scored instead of the tokenised "
        "`completion` (text sampled by another server does not always tokenise back to the same tokens)",
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptedItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt, messages: give exactly one of them")
        return self


# ----- /logprobs -----
class LogprobsItem(PromptedItem):
    pass


class LogprobsRequest(LenientRequest):
    model: ModelName = "student"
    items: Annotated[list[LogprobsItem], FAIL_FAST] = Field(min_length=1)


class CompletionScore(BaseModel):
    tokens: list[str] = Field(description="the completion's tokens, decoded one by one")
    token_logprobs: list[float]
    sum: float
    mean: float = Field(description="0.0 for a completion of no tokens")
    num_tokens: int


class LogprobsResponse(BaseModel):
    adapter_version: int
    results: list[CompletionScore] = Field(description="one per item, in order")


# ----- /grpo/step -----
class GrpoStepItem(PromptedItem):
    completion: str = Field(min_length=1)
    advantage: FiniteFloat
    old_logprobs: Annotated[list[FiniteFloat], FAIL_FAST] | None = Field(
        default=None,
        description="PPO's old policy: the trainer's own log-prob of each completion token under the adapter "
        "the sample is credited to (e.g. from /logprobs), one per token of `completion` as the trainer's tokenizer "
        "splits it (else 400); None = the current adapter (ratio 1)",
    )
    sampler_logprobs: Annotated[list[FiniteFloat], FAIL_FAST] | None = Field(
        default=None,
        description="the behaviour policy: the log-prob of each completion token as the server that sampled it "
        "reported it (e.g. vLLM's logprobs); the token's loss is weighted by min(exp(old - sampler), "
        "loss.is_cap). None = sampled by this trainer (weight 1)",
    )
    weight: FiniteFloat = Field(default=1.0, ge=0.0, description="multiplies the item's loss")


class GrpoStepRequest(LenientRequest):
    items: Annotated[list[GrpoStepItem], FAIL_FAST] = Field(min_length=1)
    loss: LossSettings = Field(default_factory=LossSettings)
    step_key: str | None = Field(
        default=None,
        max_length=256,
        description="a retried step with the last step's key is answered from memory, not applied twice",
    )


class UpdateStats(BaseModel):
    """One optimizer step of a /grpo/step (its mini-batch of items)."""

    items: int
    tokens: int
    loss: float = Field(description="the mini-batch's loss, normalised by its own item count")
    grad_norm: float = Field(description="before clipping")
    clip_fraction: float = Field(
        description="share of the mini-batch's completion tokens whose ratio was clipped"
    )


class GrpoStepResponse(BaseModel):
    loss: float = Field(description="the updates' losses, each weighted by its share of the items")
    kl: float = Field(description="mean per-sequence KL to the base model")
    clip_fraction: float = Field(description="share of completion tokens whose ratio was clipped")
    grad_norm: float = Field(description="before clipping; the mean over the updates")
    tokens: int
    adapter_version: int = Field(description="the version after this step")
    step: int
    duplicate: bool = Field(description="true: the step_key matched the last step, nothing was applied")
    is_weight_mean: float = Field(
        default=1.0, description="mean importance weight over the tokens with sampler_logprobs (1.0: none)"
    )
    is_truncated_fraction: float = Field(
        default=0.0, description="share of the tokens with sampler_logprobs whose weight was cut to is_cap"
    )
    adapter_path: str | None = Field(
        default=None,
        description="the PEFT directory of this version's adapter (TRAINER_ADAPTER_EXPORT_DIR; None when off)",
    )
    micro_batches: int = Field(
        default=0, description="forward/backward passes the step ran (0: not reported)"
    )
    updates: int = Field(
        default=1,
        description="optimizer steps the step made (loss.updates, fewer when there were fewer items)",
    )
    per_update: list[UpdateStats] = Field(
        default_factory=list, description="one per optimizer step, in order (empty: not reported)"
    )
