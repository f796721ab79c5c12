"""A fresh clone with nothing beside it runs the README's demo: the repository is cloned into an empty temporary
folder and `azt demo` runs its first train step and a short eval from there, with no GSM8K_PATH and no hub
(HF_ENDPOINT points at a closed port, as on a machine with no route to it), so GSM8K comes from the copy the
clone ships.

What a user's `bash .ci/setup.sh` would add in the clone is left out on purpose: setup.sh reuses the cached
virtualenv (its key is the hash of pyproject.toml and setup.sh, which the clone shares) and re-points the
editable install at the clone, which would take the shared virtualenv away from the checkout running these
tests. The clone's code runs with PYTHONPATH instead, which is what the re-pointed editable install gives.
The clone holds HEAD plus this checkout's uncommitted changes to tracked files (none in CI), so a developer
tests what they are about to commit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def git(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, check=True).stdout


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if subprocess.run(["git", "rev-parse"], cwd=REPO_ROOT, capture_output=True).returncode != 0:
        pytest.skip(f"{REPO_ROOT} is not a git checkout (nothing to clone)")
    empty = tmp_path / "empty"
    empty.mkdir()
    clone = empty / "alphazero-llm-trainer"
    git("clone", "--quiet", str(REPO_ROOT), str(clone), cwd=empty)
    changes = git("diff", "HEAD", "--binary", cwd=REPO_ROOT)
    if changes:
        git("apply", "--whitespace=nowarn", "-", cwd=clone, stdin=changes)
    return clone


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_demo_runs_from_a_fresh_clone_with_nothing_beside_it(fresh_clone: Path):
    assert sorted(p.name for p in fresh_clone.parent.iterdir()) == [fresh_clone.name]
    assert not (fresh_clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSM8K_", "HF_", "PYTHON"))}
    env.update(PYTHONPATH=str(fresh_clone), HF_ENDPOINT=closed_port_url(), PYTHONUNBUFFERED="1")
    figures = fresh_clone / "runs" / "demo.json"
    demo = [
        *("--train-examples", "1", "--batch-size", "1", "--root-samples", "2"),
        *("--iterations", "1", "--n-student", "1", "--max-tokens", "32"),
        *("--eval-examples", "2", "--eval-max-tokens", "24", "--request-timeout", "300"),
        *("--workdir", "runs/demo", "--json-out", str(figures)),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", *demo],
        cwd=fresh_clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    result = json.loads(figures.read_text())
    assert result["train_problems"] == 1 and result["eval_problems"] == 2
    # The first train step ran: applied (adapter version + 1) or skipped because every path scored the same.
    assert result["adapter_version_end"] - result["adapter_version_start"] == result["train_steps"] <= 1
    # The clone's own code and data served the demo: its shipped GSM8K, chosen because the hub did not answer.
    dataset = fresh_clone / "orchestrator" / "gsm8k" / "dataset"
    (gsm8k_line,) = [line for line in done.stdout.splitlines() if line.startswith("GSM8K:")]
    assert gsm8k_line.split()[1:3] == ["shipped", str(dataset)]
    assert "from the hub" in gsm8k_line
    assert (fresh_clone / "runs" / "demo" / "orchestrator" / "jobs.sqlite").is_file()
    # nothing was written beside the clone
    assert sorted(p.name for p in fresh_clone.parent.iterdir()) == [fresh_clone.name]
