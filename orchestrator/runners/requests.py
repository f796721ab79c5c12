"""What a train or eval job is asked to do: the bodies of POST /train and POST /eval, with their limits.

The API validates a request with these models before it becomes a job; the runner reads the stored request
back through them. Unknown fields are rejected (services.protocol's StrictModel) so a typo gives a 422 naming
the field instead of being ignored. The loss settings are the trainer's own (services.protocol.LossSettings) with
the training recipe's defaults (RecipeLoss): a loss the trainer would refuse is refused here, at submission.
Search fields left out (None) fall back to the service settings (MAX_TREE_DEPTH, NUM_MCTS_ITERATIONS,
MAX_TOKENS, ...); their bounds and defaults are SearchConfig's (orchestrator/settings.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from orchestrator.settings import RewardWeights, SearchConfig, Settings, field_constraints
from services.protocol import LossSettings, StrictModel
from services.protocol.common import FiniteFloat
from services.protocol.training import LossType

GSM8K_TRAIN_SIZE = 7473
GSM8K_TEST_SIZE = 1319


def _check_fits_split(split: str, offset: int, num_examples: int) -> None:
    size = GSM8K_TRAIN_SIZE if split == "train" else GSM8K_TEST_SIZE
    if offset + num_examples > size:
        raise ValueError(
            f"offset + num_examples = {offset + num_examples} exceeds the {size} problems of the {split} split"
        )


def _override(model: type[BaseModel], name: str) -> Any:
    """An optional field with `model.<name>`'s bounds and description; None keeps the default."""
    return Field(default=None, **field_constraints(model, name))


class RewardParams(StrictModel):
    """Overrides of the path reward weights (settings.RewardWeights: its bounds); unset ones keep the default."""

    hre: float | None = _override(RewardWeights, "hre")
    pre: float | None = _override(RewardWeights, "pre")
    length_penalty: float | None = _override(RewardWeights, "length_penalty")
    right_bonus: float | None = _override(RewardWeights, "right_bonus")
    wrong_bonus: float | None = _override(RewardWeights, "wrong_bonus")
    discount: float | None = _override(RewardWeights, "discount")
    dense_cap: float | None = _override(RewardWeights, "dense_cap")


class SearchParams(StrictModel):
    """Overrides of the search defaults for one job: the knobs a request may set, with SearchConfig's bounds."""

    shape: Literal["fork", "line"] | None = _override(SearchConfig, "shape")
    max_depth: int | None = _override(SearchConfig, "max_depth")
    iterations: int | None = _override(SearchConfig, "iterations")
    max_tokens: int | None = _override(SearchConfig, "max_tokens")
    chunk_tokens: int | None = _override(SearchConfig, "chunk_tokens")
    parallel_simulations: int | None = _override(SearchConfig, "parallel_simulations")
    selection: Literal["puct", "uct"] | None = _override(SearchConfig, "selection")
    c_puct: float | None = _override(SearchConfig, "c_puct")
    n_teacher_right: int | None = _override(SearchConfig, "n_teacher_right")
    n_teacher_wrong: int | None = _override(SearchConfig, "n_teacher_wrong")
    n_student: int | None = _override(SearchConfig, "n_student")
    root_samples: int | None = _override(SearchConfig, "root_samples")
    teacher_gold: bool | None = _override(SearchConfig, "teacher_gold")
    prior_temperature: float | None = _override(SearchConfig, "prior_temperature")
    temperature: float | None = _override(SearchConfig, "temperature")
    rollout: bool | None = _override(SearchConfig, "rollout")
    rollout_max_tokens: int | None = _override(SearchConfig, "rollout_max_tokens")
    use_checker: bool | None = _override(SearchConfig, "use_checker")
    teacher_temperature: float | None = _override(SearchConfig, "teacher_temperature")
    seed: int | None = _override(SearchConfig, "seed")
    one_line_steps: bool | None = _override(SearchConfig, "one_line_steps")
    teacher_reference: bool | None = _override(SearchConfig, "teacher_reference")
    rewards: RewardParams | None = None

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _loss_default(name: str, default: Any) -> Any:
    """A LossSettings field with another default and the trainer's own bounds and description."""
    return Field(default=default, **field_constraints(LossSettings, name))


class RecipeLoss(LossSettings):
    """The /grpo/step loss settings (the trainer's own model and bounds) with the training recipe's defaults
    (issue #19, docs/learning-design.md): dr_grpo (no length bias), beta 0 (TRL, DAPO; no reference pass), clip
    0.2 below and 0.28 above (DAPO's clip-higher against entropy collapse), learning rate 5e-4. A request that
    sets one of them keeps the others.

    Why 5e-4 (TRAINER_LEARNING_RATE stays the trainer's own fallback for steps that send none): SmolLM2-135M/
    360M-Instruct's own supervised fine-tuning used full fine-tuning at 1e-3 (huggingface/alignment-handbook,
    recipes/smollm2/sft/config_smol.yaml); RL full-fine-tuning rates run ~20-100x below SFT rates (TRL: GRPO
    1e-6 against SFT 2e-5), i.e. 1e-5..5e-5 here; LoRA wants ~10x full fine-tuning (LoRA Without Regret), so
    1e-4..5e-4. On an H200 (issue #19's probes) 5e-5 moved nothing in 16-18 steps, and 5e-4 with the gold path in
    all-wrong groups moved strict accuracy (p = 0.014) without collapse. bench/learning.py --dev checks it on a
    dev split carved from GSM8K train."""

    type: LossType = _loss_default("type", "dr_grpo")
    beta: FiniteFloat = _loss_default("beta", 0.0)
    clip_eps: FiniteFloat = _loss_default("clip_eps", 0.2)
    clip_eps_high: FiniteFloat | None = _loss_default("clip_eps_high", 0.28)
    learning_rate: FiniteFloat | None = _loss_default("learning_rate", 5e-4)


class TrainRequest(StrictModel):
    split: Literal["train", "test"] = "train"
    num_examples: int = Field(default=8, ge=1, le=GSM8K_TRAIN_SIZE, description="problems to train on")
    offset: int = Field(default=0, ge=0, le=GSM8K_TRAIN_SIZE - 1, description="index of the first problem")
    epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=64, ge=1, le=256, description="problems (search trees) per GRPO step")
    search: SearchParams = Field(default_factory=SearchParams)
    loss: RecipeLoss = Field(
        default_factory=RecipeLoss,
        description="the /grpo/step loss settings, with the trainer's bounds and the recipe's defaults",
    )
    advantage_mode: Literal["flat", "tree", "rejection"] = Field(
        default="flat",
        description="flat: one item per answer, A = R - mean(R) over the tree; tree: one item per segment, "
        "TreeRL's local + global value advantage; rejection: fine-tuning on the distinct correct answers",
    )
    advantage_clip: float = Field(default=5.0, gt=0, le=100)
    scale_advantages: bool = Field(
        default=False,
        description="divide flat advantages by the group's std (GRPO's z-score); off: Dr. GRPO, no std scaling",
    )
    teacher_paths: Literal["guided", "group"] = Field(
        default="guided",
        description="flat mode: how paths with teacher-written text train. guided: the baseline is the mean "
        "reward of the student's own answers, which train only where they are both right and wrong; a teacher "
        "path trains from its first teacher-written line, the student's lines before it as context. group: every "
        "path is a group member, A = R - mean over all, whole paths (phase 2's rule)",
    )
    teacher_weight: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="loss weight of items holding teacher-written text (off-policy; the reference path is "
        "correct by construction, so full weight by default)",
    )
    max_generated_tokens: int | None = Field(
        default=None,
        ge=1,
        le=10**12,
        description="stop after the step at which the job's generated tokens (student + teacher, every step "
        "counted) reach this many; that step's checkpoint is saved and the result says why it stopped",
    )
    checkpoint_every: int = Field(default=1, ge=1, le=100000, description="save a checkpoint every N steps")
    eval_every: int | None = Field(default=None, ge=1, le=100000, description="evaluate every M steps")
    eval_examples: int = Field(default=10, ge=1, le=GSM8K_TEST_SIZE)
    eval_max_tokens: int = Field(default=256, ge=16, le=4096)
    eval_concurrency: int = Field(default=32, ge=1, le=256, description="answers in flight in the quick eval")
    trees_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="searches run concurrently (default: the whole batch, within MAX_TREES_IN_FLIGHT)",
    )

    @model_validator(mode="after")
    def _fits_split(self) -> TrainRequest:
        _check_fits_split(self.split, self.offset, self.num_examples)
        return self


class EvalRequest(StrictModel):
    split: Literal["train", "test"] = "test"
    num_examples: int = Field(default=50, ge=1, le=GSM8K_TEST_SIZE)
    offset: int = Field(default=0, ge=0, le=GSM8K_TRAIN_SIZE - 1)
    models: list[Literal["base", "student"]] = Field(
        default_factory=lambda: ["base", "student"], min_length=1, max_length=2
    )
    max_tokens: int = Field(default=256, ge=16, le=4096, description="token budget of one answer")
    # 32 fills one trainer batch (TRAINER_MAX_BATCH_SIZE); at 8 an eval on the GPU left most of the batch empty.
    concurrency: int = Field(default=32, ge=1, le=256, description="answers requested at once")

    @model_validator(mode="after")
    def _fits_split(self) -> EvalRequest:
        _check_fits_split(self.split, self.offset, self.num_examples)
        if len(set(self.models)) != len(self.models):
            raise ValueError("models must not repeat")
        return self


def search_config(settings: Settings, request: TrainRequest) -> SearchConfig:
    """The service defaults (MAX_TREE_DEPTH, NUM_MCTS_ITERATIONS, ...) with the request's overrides."""
    return SearchConfig.from_settings(settings, **request.search.overrides())


def trees_in_flight(settings: Settings, request: TrainRequest) -> int:
    """The searches of a step run at once: all of its batch by default, at most MAX_TREES_IN_FLIGHT."""
    return min(request.trees_in_flight or request.batch_size, settings.max_trees_in_flight)
