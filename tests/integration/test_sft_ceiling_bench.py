"""bench/sft_ceiling.py end to end on the tiny random CPU model: base judged, a fresh adapter fine-tuned on gold
solutions through the trainer's own step, judged again per step count, rows written. Checks the script's path
and its figures' shape, not learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration]


def test_sft_ceiling_fine_tunes_and_judges_each_learning_rate(repo_root, tiny_random_model_dir, tmp_path):
    out = tmp_path / "ceiling.json"
    cmd = [
        sys.executable,
        "bench/sft_ceiling.py",
        "--learning-rates",
        "1e-3,1e-2",
        "--steps",
        "1,2",
        "--batch",
        "2",
        "--eval-examples",
        "3",
        "--train-examples",
        "3",
        "--max-tokens",
        "8",
        "--json-out",
        str(out),
    ]
    env = {**os.environ, "TRAINER_MODEL_SOURCE": str(tiny_random_model_dir), "TRAINER_DEVICE": "cpu"}
    done = subprocess.run(
        cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n"] == 3
    assert [(r["learning_rate"], r["steps"], r["examples"]) for r in result["rows"]] == [
        (1e-3, 1, 2),
        (1e-3, 2, 4),
        (1e-2, 1, 2),
        (1e-2, 2, 4),
    ]
    for row in result["rows"]:
        assert (
            0.0 <= row["strict"] <= 1.0 and 0.0 <= row["p_strict"] <= 1.0 and 0.0 <= row["p_flexible"] <= 1.0
        )
    assert len({r["base_strict"] for r in result["rows"]}) == 1  # one base, judged once
