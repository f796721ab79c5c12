"""bench/learning.py end to end on the tiny CPU model, with the reference teacher: a first piece cut short
(exit 3), a second that goes on from its state, three arms stopped at a token budget and judged, the JSON, PNG
and runs log written. Budgets are minimal; this checks the script's path, not learning. Also the lm-eval gsm8k
extraction it reports beside ours."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest


def _bench_learning(repo_root):
    spec = importlib.util.spec_from_file_location("bench_learning", repo_root / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
        ("#### 1,000.\nThat is $1,000.", "1,000.", "$1,000."),  # lm-eval keeps the raw text, then drops , $ .
        ("So 12 and then 5", "[invalid]", "5"),
        ("#### 12\n#### 13", "12", "13"),  # strict: the first '#### N'; flexible: the last number-like run
        ("no numbers here", "[invalid]", "[invalid]"),
    ],
)
def test_lm_eval_gsm8k_extraction(repo_root, text, strict, flexible):
    bench = _bench_learning(repo_root)
    assert bench.lm_eval_extract(text, "strict") == strict
    assert bench.lm_eval_extract(text, "flexible") == flexible


def test_lm_eval_gsm8k_match(repo_root):
    bench = _bench_learning(repo_root)
    assert bench.lm_eval_correct("#### 1,000.", "1000", "strict")
    assert bench.lm_eval_correct("The total is $18.", "18", "flexible")
    assert not bench.lm_eval_correct("#### 18.0", "18", "strict")  # an exact string match, unlike ours
    assert not bench.lm_eval_correct("#### 72", "18", "strict")


@pytest.mark.integration
def test_learning_bench_pieces_budget_and_three_arms(repo_root, trainer_model_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "bench/learning.py",
        "--workdir",
        str(tmp_path / "work"),
        "--arms",
        "grpo,mcts,sft_gold",
        "--token-budget",
        "40",
        "--eval-examples",
        "4",
        "--eval-chunks",
        "2",
        "--eval-max-tokens",
        "16",
        "--curve-every",
        "1",
        "--curve-examples",
        "2",
        "--train-examples",
        "3",
        "--batch-size",
        "1",
        "--root-samples",
        "2",
        "--iterations",
        "1",
        "--max-tokens",
        "32",
        "--group",
        "2",
        "--json-out",
        str(out / "learning.json"),
        "--png-out",
        str(out / "learning.png"),
        "--runs-log",
        str(out / "runs.json"),
    ]
    env = {**os.environ, "TRAINER_MODEL_SOURCE": str(trainer_model_dir)}

    def run(*extra):
        return subprocess.run(
            cmd + list(extra),
            cwd=repo_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )

    first = run("--piece-s", "1")  # over before the base eval ends: state kept, exit 3
    assert first.returncode == 3, first.stdout[-3000:] + first.stderr[-3000:]
    assert "piece over" in first.stdout and not (out / "learning.json").exists()

    done = run()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "learning.json").read_text())
    assert result["n"] == 4 and result["arm"] == "mcts" and result["pieces"] == 2
    assert result["teacher"].startswith("reference") and result["token_budget"] == 40
    assert [a["name"] for a in result["ablations"]] == ["grpo", "mcts", "sft_gold"]
    for arm in result["ablations"]:
        assert 0.0 <= arm["acc"] <= 1.0 and 0.0 <= arm["p_value"] <= 1.0
        assert 0.0 <= arm["acc_lm_eval_strict"] <= 1.0 and 0.0 <= arm["p_value_lm_eval_flexible"] <= 1.0
        # the job's max_generated_tokens stopped it after its first step (3 problems would allow 3 steps)
        assert arm["budget_reached"] and arm["generated_tokens"] >= 40, arm
        assert arm["generated_tokens"] == arm["student_tokens"] + arm["teacher_tokens"], arm
    grpo, mcts, sft = result["ablations"]
    assert grpo["teacher_tokens"] == 0 and sft["student_tokens"] == 0 and mcts["teacher_tokens"] > 0
    # the student alone is all wrong at 32 tokens: its group is dropped; the gold answer gives mcts a signal
    assert grpo["applied_steps"] <= 1 and mcts["applied_steps"] == sft["applied_steps"] == 1
    assert sft["train_seconds"] > 0
    curve = result["curves"]["sft_gold"]
    assert curve[0] == {**curve[0], "tokens": 0, "step": 0} and curve[-1]["step"] == "final"
    assert [p["tokens"] for p in curve] == sorted(p["tokens"] for p in curve)
    assert result["requests"]["sft_gold"]["advantage_mode"] == "rejection"
    assert "loss" not in result["requests"]["mcts"]  # the product's default loss
    assert {r["max_generated_tokens"] for r in result["requests"].values()} == {40}
    assert (out / "learning.png").stat().st_size > 1000
    assert len(json.loads((out / "runs.json").read_text())) == 3

    # Resumable: run again with the same workdir; every arm is kept, nothing is trained again.
    again = run()
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("done before, kept") == 3


@pytest.mark.integration
def test_learning_bench_dev_mode_never_touches_test(repo_root, trainer_model_dir, tmp_path):
    """--dev: base and arm judged on the last train problems, the arm trained before them, no test problem
    asked (the job's quick eval is off), outputs in learning_dev.*."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "bench/learning.py",
        "--dev",
        "--dev-examples",
        "3",
        "--workdir",
        str(tmp_path / "work"),
        "--arms",
        "lr2e-4",
        "--arm",
        'lr2e-4={"loss": {"learning_rate": 0.0002}}',
        "--head",
        "lr2e-4",
        "--token-budget",
        "30",
        "--eval-chunks",
        "1",
        "--eval-max-tokens",
        "16",
        "--curve-every",
        "1",
        "--train-offset",
        "7468",
        "--batch-size",
        "1",
        "--root-samples",
        "2",
        "--iterations",
        "1",
        "--max-tokens",
        "24",
        "--json-out",
        str(out / "learning_dev.json"),
        "--png-out",
        str(out / "learning_dev.png"),
        "--runs-log",
        str(out / "runs.json"),
    ]
    env = {**os.environ, "TRAINER_MODEL_SOURCE": str(trainer_model_dir)}
    done = subprocess.run(
        cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "learning_dev.json").read_text())
    assert result["dev"] and result["n"] == 3 and result["eval_split"].startswith("train")
    assert result["eval_offset"] == 7473 - 3 and result["arm"] == "lr2e-4"
    request = result["requests"]["lr2e-4"]
    assert request["offset"] + request["num_examples"] <= 7473 - 3 and "eval_every" not in request
    assert request["loss"] == {"learning_rate": 0.0002}
    state = json.loads((tmp_path / "work" / "learning_state.json").read_text())
    judged = {r["problem_id"] for r in state["base_rows"]}
    assert judged == {"train-7470", "train-7471", "train-7472"}
    runs = json.loads((out / "runs.json").read_text())
    assert runs[0]["tag"] == "dev"
