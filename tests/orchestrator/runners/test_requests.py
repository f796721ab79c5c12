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
        ({"loss": {"updates": 0}}, "updates"),
        ({"batch_size": -1}, "batch_size"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"teacher_paths": "whole"}, "teacher_paths"),
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


def test_a_bare_train_request_is_the_recipe():
    """POST /train with no loss or search overrides trains with issue #19's recipe (docs/learning-design.md)."""
    from orchestrator.runners.requests import search_config, trees_in_flight
    from orchestrator.settings import Settings

    request = TrainRequest()
    loss = request.loss
    assert (loss.type, loss.beta, loss.clip_eps, loss.clip_eps_high, loss.learning_rate) == (
        "dr_grpo",
        0.0,
        0.2,
        0.28,
        5e-4,
    )
    assert (request.batch_size, request.advantage_mode, request.scale_advantages) == (64, "flat", False)
    assert request.teacher_weight == 1.0 and request.max_generated_tokens is None
    assert request.teacher_paths == "guided"  # since session 4's H200 run (docs/learning-design.md)
    settings = Settings()
    config = search_config(settings, request)
    assert config.shape == "fork" and config.student_rows() == 8  # 4 answers + 2 forks x 2 continuations
    assert (config.root_samples, config.iterations, config.parallel_simulations, config.n_student) == (
        4,
        2,
        2,
        2,
    )
    assert (config.temperature, config.max_tokens, config.use_checker, config.teacher_gold) == (
        1.0,
        256,
        False,
        True,
    )
    assert (config.n_teacher_right, config.n_teacher_wrong) == (1, 0)
    assert (config.rewards.hre, config.rewards.pre, config.rewards.dense_cap) == (1.0, 0.0, 0.1)
    assert trees_in_flight(settings, request) == 64  # the whole batch at once
    assert trees_in_flight(Settings(max_trees_in_flight=16), request) == 16
    assert trees_in_flight(settings, TrainRequest(batch_size=4, trees_in_flight=2)) == 2


def test_one_loss_override_keeps_the_rest_of_the_recipe():
    loss = TrainRequest.model_validate({"loss": {"learning_rate": 2e-4}}).loss
    assert loss.learning_rate == 2e-4 and loss.type == "dr_grpo" and loss.clip_eps_high == 0.28


def test_max_generated_tokens_bounds():
    assert TrainRequest(max_generated_tokens=1000).max_generated_tokens == 1000
    with pytest.raises(ValidationError, match="max_generated_tokens"):
        TrainRequest.model_validate({"max_generated_tokens": 0})
