"""bench/search_throughput.py end to end at toy sizes (tiny model on CPU): every phase runs against one trainer
and the reference teacher, and its figures add up. The script's path, not its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_search_throughput_bench_runs_every_phase(repo_root, trainer_model_dir, tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [
        sys.executable,
        "bench/search_throughput.py",
        "--phases",
        "sample,search_fork,search_line_embedded,search_line_reference,search_line_reference_nochecker",
        "--problems",
        "1",
        "--group",
        "2",
        "--max-tokens",
        "24",
        "--search-max-tokens",
        "48",
        "--rollout-max-tokens",
        "16",
        "--iterations",
        "2",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    env = {**os.environ, "TRAINER_MODEL_SOURCE": str(trainer_model_dir)}
    done = subprocess.run(
        cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = result["phases"]
    assert list(phases) == [
        "sample",
        "search_fork",
        "search_line_embedded",
        "search_line_reference",
        "search_line_reference_nochecker",
    ]
    sample = phases["sample"]
    assert sample["requests_per_tree"] == 1 and sample["student_tokens"] == sample["generated_tokens"] > 0
    assert sample["by_kind"]["student_answer"]["rows"] == 2 and sample["tokens_per_s_vs_sample"] == 1.0
    for name, phase in phases.items():
        kinds = phase["by_kind"]
        assert phase["generated_tokens"] == sum(k["completion_tokens"] for k in kinds.values()), name
        assert phase["trainer"]["forward_passes"] > 0 and phase["request_errors"] == 0, name
    fork = phases["search_fork"]
    assert (
        "logprobs" not in fork["by_kind"] and "checker" not in fork["by_kind"]
    )  # one batch kind: the student's
    assert fork["by_kind"]["student_answer"]["requests"] >= 1 and fork["answers_per_tree"] >= 4
    assert fork["config"]["shape"] == "fork" and fork["config"]["max_tokens"] == 24
    reference = phases["search_line_reference"]["by_kind"]
    assert reference["teacher"]["requests"] > 0 and "logprobs" in reference  # teacher steps scored for priors
    assert "checker" not in phases["search_line_reference_nochecker"]["by_kind"]
    assert (
        phases["search_line_reference"]["teacher_tokens"] > 0
        and phases["search_line_embedded"]["teacher_tokens"] > 0
    )
