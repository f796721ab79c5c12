"""bench/learning.py end to end on the tiny CPU model: services started, base eval, two arms trained and
judged, the JSON, PNG, runs log and RESULTS rows written. Budgets are minimal; this checks the script's
path, not learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration]


def test_learning_bench_runs_two_arms(repo_root, gsm8k_dir, trainer_model_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "bench/learning.py",
        "--workdir",
        str(tmp_path / "work"),
        "--arms",
        "grpo,mcts",
        "--eval-examples",
        "2",
        "--eval-max-tokens",
        "16",
        "--curve-every",
        "1",
        "--curve-examples",
        "1",
        "--train-examples",
        "1",
        "--batch-size",
        "1",
        "--iterations",
        "1",
        "--max-depth",
        "2",
        "--chunk-tokens",
        "8",
        "--max-tokens",
        "24",
        "--rollout-max-tokens",
        "0",
        "--group",
        "2",
        "--json-out",
        str(out / "learning.json"),
        "--png-out",
        str(out / "learning.png"),
        "--runs-log",
        str(out / "runs.json"),
        "--results-md",
        str(out / "RESULTS.md"),
    ]
    env = {**os.environ, "GSM8K_PATH": str(gsm8k_dir), "TRAINER_MODEL_SOURCE": str(trainer_model_dir)}
    done = subprocess.run(
        cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "learning.json").read_text())
    assert result["n"] == 2 and result["trained_arm"] == "mcts"
    assert [a["name"] for a in result["ablations"]] == ["grpo", "mcts"]
    for arm in result["ablations"]:
        assert 0.0 <= arm["acc"] <= 1.0 and 0.0 <= arm["p_value"] <= 1.0 and arm["applied_steps"] <= 1
    assert result["curves"]["mcts"][0]["step"] == 0
    assert (out / "learning.png").stat().st_size > 1000
    assert len(json.loads((out / "runs.json").read_text())) == 2
    assert (out / "RESULTS.md").read_text().count("| grpo | 2 |") == 1

    # Resumable: run again with the same workdir; both arms are kept, nothing is trained again.
    again = subprocess.run(
        cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("done before, kept") == 2
