import pytest
from pydantic import ValidationError

from orchestrator.runners.requests import EvalRequest, TrainRequest


def test_defaults_are_valid():
    assert TrainRequest().num_examples >= 1
    assert EvalRequest().models == ["base", "student"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"num_examples": 0}, "num_examples"),
        ({"num_examples": 100000}, "num_examples"),
        ({"search": {"max_depth": 0}}, "max_depth"),
        ({"search": {"iterations": 10**6}}, "iterations"),
        ({"search": {"max_tokens": 8}}, "max_tokens"),
        ({"search": {"typo": 1}}, "typo"),
        ({"loss": {"type": "ppo"}}, "type"),
        ({"batch_size": -1}, "batch_size"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_train_limits_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        TrainRequest.model_validate(body)
    assert field in str(info.value)


def test_range_must_fit_the_split():
    with pytest.raises(ValidationError, match="exceeds"):
        EvalRequest(num_examples=100, offset=1300)
    with pytest.raises(ValidationError, match="exceeds"):
        TrainRequest(split="test", num_examples=10, offset=1315)


def test_eval_models_and_budgets():
    with pytest.raises(ValidationError):
        EvalRequest(models=["teacher"])
    with pytest.raises(ValidationError):
        EvalRequest(models=["base", "base"])
    with pytest.raises(ValidationError):
        EvalRequest(max_tokens=100000)
    assert EvalRequest(models=["student"], max_tokens=64).max_tokens == 64
