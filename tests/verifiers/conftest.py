"""Fixtures of the verifiers-environment tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def vf_eval():
    """Run verifiers' `vf-eval` console script of this interpreter's environment, without PYTHONPATH, so the
    environment is found the way users find it: as the installed module `alphazero_llm_trainer`."""
    script = Path(sys.executable).with_name("vf-eval")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
        )

    return run
