"""Start the real trainer service (uvicorn in a subprocess) on 127.0.0.1 for tests and benchmarks.

    with TrainerProcess(checkpoint_dir=tmp_path / "ckpt") as trainer:
        httpx.get(trainer.url + "/health")        # trainer.base_url == trainer.url + "/v1"

The model cache is the default one (~/.cache/alphazero-llm-trainer/models, or TRAINER_MODEL_CACHE_DIR), so the
GGUF -> HF conversion happens once per machine. Extra TRAINER_* settings go in `env`. `restart()` stops and starts
the same service (same port, same checkpoint directory), as after a crash. Process handling (start, health wait,
SIGTERM then SIGKILL) is the demo's own `orchestrator.local.processes.ServiceProcess`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from orchestrator.local.processes import ServiceProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        self.startup_timeout = startup_timeout
        self.service = ServiceProcess(
            "trainer",
            ["-m", "services.trainer", "--log-level", "warning"],
            env={
                "TRAINER_HOST": "127.0.0.1",
                "TRAINER_PORT": str(self.port),
                "TRAINER_CHECKPOINT_DIR": str(self.checkpoint_dir),
                **(env or {}),
            },
            log_path=Path(tempfile.mkstemp(prefix="azt-trainer-", suffix=".log")[1]),
            url=self.url,
            cwd=REPO_ROOT,
        )

    def start(self) -> TrainerProcess:
        self.service.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()  # a trainer that failed to load keeps serving its error: leave nothing behind
            raise
        return self

    def wait_healthy(self) -> dict:
        return self.service.wait_ready(self.startup_timeout)

    def stop(self) -> None:
        self.service.stop(grace_s=20.0)

    def restart(self) -> TrainerProcess:
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.service.log_tail(chars)

    def __enter__(self) -> TrainerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
