"""Start and stop local services (the trainer, the orchestrator) on 127.0.0.1, for the demo and tests.

Each service runs as `python -m <module>` in its own process group with its output in a log file; `stop`
sends SIGTERM, waits, then SIGKILL, and only ever signals the process it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        url: str,
        health_path: str = "/health",
        cwd: str | Path | None = None,
    ):
        self.name, self.args, self.env, self.log_path, self.url = name, args, env, log_path, url.rstrip("/")
        self.health_path, self.cwd = health_path, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the file descriptor
            self.proc = subprocess.Popen(
                [sys.executable, *self.args],
                env={**os.environ, **self.env},
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 600.0, ok=lambda body: True) -> dict:
        """Poll GET health_path until it answers 200 and `ok(body)`; fail early if the process exits or its
        health says status "error"."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode}; log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(self.url + self.health_path, timeout=5.0)
                body = response.json()
                if response.status_code == 200 and ok(body):
                    return body
            except (httpx.HTTPError, ValueError):
                body = None
            if isinstance(body, dict) and body.get("status") == "error":  # e.g. the model failed to load
                raise RuntimeError(f"{self.name} failed to start: {body.get('error')}; log {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} not ready at {self.url} after {timeout_s:g}s; log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of restart and resume)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def trainer_process(
    port: int, workdir: Path, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> ServiceProcess:
    """The trainer service (`python -m services.trainer`), checkpoints under workdir/trainer."""
    return ServiceProcess(
        "trainer",
        ["-m", "services.trainer"],
        {
            "TRAINER_HOST": "127.0.0.1",
            "TRAINER_PORT": str(port),
            "TRAINER_CHECKPOINT_DIR": str(workdir / "trainer" / "checkpoints"),
            **(env or {}),
        },
        workdir / "trainer.log",
        f"http://127.0.0.1:{port}",
        cwd=cwd,
    )


def orchestrator_process(
    port: int,
    trainer_url: str,
    workdir: Path,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> ServiceProcess:
    """The orchestrator (`python -m orchestrator serve`), jobs and files under workdir/orchestrator."""
    return ServiceProcess(
        "orchestrator",
        ["-m", "orchestrator", "serve", "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"],
        {"TRAINER_URL": trainer_url, "DATA_DIR": str(workdir / "orchestrator"), **(env or {})},
        workdir / "orchestrator.log",
        f"http://127.0.0.1:{port}",
        cwd=cwd,
    )


def reference_teacher_process(
    port: int, workdir: Path, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> ServiceProcess:
    """The reference teacher (`python -m orchestrator.reference_teacher`), GSM8K from GSM8K_PATH; `env` may name
    REFERENCE_TEACHER_TOKENIZER so that its usage counts the student's tokens."""
    return ServiceProcess(
        "reference-teacher",
        ["-m", "orchestrator.reference_teacher", "--log-level", "warning"],
        {"REFERENCE_TEACHER_HOST": "127.0.0.1", "REFERENCE_TEACHER_PORT": str(port), **(env or {})},
        workdir / "reference_teacher.log",
        f"http://127.0.0.1:{port}",
        cwd=cwd,
    )


def reference_teacher_for_student(port: int, workdir: Path, cwd: str | Path | None = None) -> ServiceProcess:
    """The reference teacher counting its usage in the student's tokens where the student's tokenizer is here
    (so token budgets compare teacher and student text alike). Build it once the trainer is up."""
    env: dict[str, str] = {}
    if tokenizer := student_tokenizer_file():
        env["REFERENCE_TEACHER_TOKENIZER"] = tokenizer
    return reference_teacher_process(port, workdir, env=env, cwd=cwd)


def student_tokenizer_file() -> str | None:
    """The student's tokenizer.json (the trainer's converted model directory, as TRAINER_* settings name it), so a
    reference teacher counts its tokens as the student's tokenizer would; None where there is none (it then
    counts word pieces). Call it once the trainer is up: a GGUF student is converted by then."""
    try:
        from services.trainer.model_source import resolve_model
        from services.trainer.settings import TrainerSettings

        settings = TrainerSettings()
        resolved = resolve_model(settings.model_source, settings.model_cache_dir)
    except (ImportError, ValueError, OSError):  # no trainer stack or model here
        return None
    path = Path(resolved.path) / "tokenizer.json"
    return str(path) if path.is_file() else None
