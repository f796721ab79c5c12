"""What a train or eval job is asked to do: the bodies of POST /train and POST /eval, with their limits.

The API validates a request with these models before it becomes a job; the runner reads the stored request
back through them. Unknown fields are rejected (services.protocol's StrictModel) so a typo gives a 422 naming
the field instead of being ignored. The loss settings are the trainer's own (services.protocol.LossSettings): a
loss the trainer would refuse is refused here, at submission. Search fields left out (None) fall back to the
service settings (MAX_TREE_DEPTH, NUM_MCTS_ITERATIONS, MAX_TOKENS, ...); their bounds are SearchConfig's
(orchestrator/settings.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from orchestrator.settings import RewardWeights, SearchConfig, Settings, field_constraints
from services.protocol import LossSettings, StrictModel

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


class SearchParams(StrictModel):
    """Overrides of the search defaults for one job: the knobs a request may set, with SearchConfig's bounds."""

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


class TrainRequest(StrictModel):
    split: Literal["train", "test"] = "train"
    num_examples: int = Field(default=8, ge=1, le=GSM8K_TRAIN_SIZE, description="problems to train on")
    offset: int = Field(default=0, ge=0, le=GSM8K_TRAIN_SIZE - 1, description="index of the first problem")
    epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=2, ge=1, le=256, description="problems (search trees) per GRPO step")
    search: SearchParams = Field(default_factory=SearchParams)
    loss: LossSettings = Field(
        default_factory=LossSettings, description="the /grpo/step loss settings, with the trainer's bounds"
    )
    advantage_mode: Literal["flat", "tree", "rejection"] = "flat"
    advantage_clip: float = Field(default=5.0, gt=0, le=100)
    teacher_weight: float = Field(
        default=0.5, ge=0, le=10, description="loss weight of items holding teacher-written text (off-policy)"
    )
    checkpoint_every: int = Field(default=1, ge=1, le=100000, description="save a checkpoint every N steps")
    eval_every: int | None = Field(default=None, ge=1, le=100000, description="evaluate every M steps")
    eval_examples: int = Field(default=10, ge=1, le=GSM8K_TEST_SIZE)
    eval_max_tokens: int = Field(default=256, ge=16, le=4096)
    eval_concurrency: int = Field(default=32, ge=1, le=256, description="answers in flight in the quick eval")
    trees_in_flight: int | None = Field(default=None, ge=1, le=1024, description="searches run concurrently")

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
