"""Start the real trainer service (uvicorn in a subprocess) on 127.0.0.1 for tests and benchmarks.

    with TrainerProcess(checkpoint_dir=tmp_path / "ckpt") as trainer:
        httpx.get(trainer.url + "/health")        # trainer.base_url == trainer.url + "/v1"

The model cache is the default one (~/.cache/alphazero-llm-trainer/models, or TRAINER_MODEL_CACHE_DIR), so the
GGUF -> HF conversion happens once per machine. Extra TRAINER_* settings go in `env`. `restart()` stops and starts
the same service (same port, same checkpoint directory), as after a crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrainerProcess:
    def __init__(
        self,
        checkpoint_dir: Path | str | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 300.0,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.checkpoint_dir = Path(checkpoint_dir or tempfile.mkdtemp(prefix="azt-trainer-ckpt-"))
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.log_path = Path(tempfile.mkstemp(prefix="azt-trainer-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self) -> TrainerProcess:
        env = {
            **os.environ,
            "TRAINER_HOST": "127.0.0.1",
            "TRAINER_PORT": str(self.port),
            "TRAINER_CHECKPOINT_DIR": str(self.checkpoint_dir),
            **self.extra_env,
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.trainer", "--log-level", "warning"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_healthy()
        return self

    def wait_healthy(self) -> dict:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"trainer exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(self.url + "/health", timeout=5)
                if response.status_code == 200:
                    return response.json()
                if response.json().get("status") == "error":
                    raise RuntimeError(f"trainer failed to load: {response.json().get('error')}")
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"trainer not healthy after {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> TrainerProcess:
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> TrainerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
