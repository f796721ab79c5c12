"""/logprobs and /grpo/step request validation: every refusal names its field."""

import pytest
from pydantic import ValidationError

from services.protocol import GrpoStepRequest, LogprobsRequest
from support.validation import field_of


def test_logprobs_items_need_exactly_one_prompt():
    assert LogprobsRequest(items=[{"prompt": "a", "completion": "b"}]).model == "student"
    for item in [
        {"completion": "b"},
        {"prompt": "a", "messages": [{"role": "user", "content": "a"}], "completion": "b"},
    ]:
        with pytest.raises(ValidationError, match="exactly one"):
            LogprobsRequest(items=[item])


@pytest.mark.parametrize(
    "item, field",
    [
        ({"prompt": "a", "completion": "b", "advantage": float("nan")}, "items.0.advantage"),
        ({"prompt": "a", "completion": "b", "advantage": float("inf")}, "items.0.advantage"),
        ({"prompt": "a", "completion": "", "advantage": 1.0}, "items.0.completion"),
        ({"prompt": "a", "completion": "b", "advantage": 1.0, "weight": -1}, "items.0.weight"),
        (
            {"prompt": "a", "completion": "b", "advantage": 1.0, "old_logprobs": [float("nan")]},
            "items.0.old_logprobs.0",
        ),
    ],
)
def test_grpo_item_refusals(item, field):
    with pytest.raises(ValidationError) as info:
        GrpoStepRequest(items=[item])
    assert field in field_of(info.value)


def test_grpo_loss_defaults_and_bad_type():
    req = GrpoStepRequest(items=[{"prompt": "a", "completion": "b", "advantage": 0.5}])
    assert (
        req.loss.type,
        req.loss.beta,
        req.loss.clip_eps,
        req.loss.max_grad_norm,
        req.loss.micro_batch_size,
        req.loss.updates,
    ) == ("grpo", 0.04, 0.2, 1.0, None, 1)  # None: the trainer packs by TRAINER_MICRO_BATCH_TOKENS
    with pytest.raises(ValidationError) as info:
        GrpoStepRequest(items=[{"prompt": "a", "completion": "b", "advantage": 0.5}], loss={"type": "ppo"})
    assert "loss.type" in field_of(info.value)


@pytest.mark.parametrize(
    "loss",
    [
        {"clip_eps": 1.0},
        {"clip_eps": 2},
        {"beta": -0.1},
        {"beta": 11},
        {"clip_eps_high": 11},
        {"learning_rate": 1e300},
        {"updates": 0},
        {"updates": 17},
    ],
)
def test_loss_settings_refuse_what_the_step_cannot_honour(loss):
    """One set of bounds for the trainer and, once it imports LossSettings, the orchestrator's /train."""
    with pytest.raises(ValidationError) as info:
        GrpoStepRequest(items=[{"prompt": "a", "completion": "b", "advantage": 0.5}], loss=loss)
    assert field_of(info.value) == {f"loss.{next(iter(loss))}"}
