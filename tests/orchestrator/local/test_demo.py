"""`azt demo`'s pure parts: where it runs from, the /train it sends, and what its table says."""

from __future__ import annotations

from orchestrator.cli import build_parser
from orchestrator.local.demo import REPO_ROOT, print_table, train_request
from orchestrator.runners.requests import TrainRequest, search_config
from orchestrator.settings import Settings


def test_the_demo_runs_from_the_checkout():
    # services start with cwd=REPO_ROOT (python -m services.trainer) and GSM8K is looked for beside it
    assert (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "services" / "trainer").is_dir()


def test_the_demo_trains_on_the_recipe_in_a_smaller_shape():
    args = build_parser().parse_args(["demo"])
    assert args.teacher == "reference"
    request = TrainRequest.model_validate(train_request(args))
    assert "loss" not in train_request(args)  # the recipe's loss
    config = search_config(Settings(), request)
    assert config.shape == "fork" and config.student_rows() == 8 and config.max_tokens == 160
    assert (request.num_examples, request.batch_size, request.loss.learning_rate) == (4, 2, 5e-4)
    faster = build_parser().parse_args(["demo", "--learning-rate", "1e-4", "--teacher", "embedded"])
    assert train_request(faster)["loss"] == {"learning_rate": 1e-4} and faster.teacher == "embedded"


def test_the_table_says_what_it_can_and_cannot_show(capsys):
    models = {
        "base": {"strict_acc": 0.0, "flexible_acc": 0.125},
        "student": {"strict_acc": 0.0, "flexible_acc": 0.083},
    }
    eval_job = {
        "result": {
            "n": 24,
            "models": models,
            "comparison": {"strict": {"p_value": 1.0}, "flexible": {"p_value": 1.0}},
        }
    }
    train_job = {"result": {"applied_steps": 2, "trees": 4, "generated_tokens": 4321}}
    print_table(train_job, eval_job, "reference")
    out = capsys.readouterr().out
    assert "teacher: reference" in out and "4,321 generated tokens" in out
    assert "cannot show: a gain" in out and "bench/RESULTS.md" in out and "learning.png" in out
