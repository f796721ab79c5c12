"""The trainer with its model in a process of its own (TRAINER_ENGINE_PROCESS), where the split can fail: the
engine process killed during requests (every request answers 503 at once, /health says why, nothing hangs), and
the service stopped or killed (the engine process never outlives it). What both modes share is tested against
both in test_trainer_service.py and test_trainer_streaming.py."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch")

from support.trainer_process import TrainerProcess

pytestmark = pytest.mark.integration

# The base model counts on, token after token, until max_tokens: seconds of decoding on a CPU.
LONG = {"model": "base", "prompt": "1, 2, 3, 4,", "max_tokens": 1500, "temperature": 0}


def engine_pid(trainer: TrainerProcess) -> int:
    """The engine process: the service's child started by multiprocessing's spawn (beside its resource tracker)."""
    pid = trainer.service.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    engines = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(engines) == 1, children
    return engines[0]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


@pytest.fixture
def trainer(trainer_model_dir, tmp_path):
    env = {"TRAINER_ENGINE_PROCESS": "true"}
    with TrainerProcess(checkpoint_dir=tmp_path / "ckpt", env=env) as process:
        yield process


def test_a_killed_engine_answers_503_at_once_and_health_says_why(trainer):
    url = trainer.url
    with httpx.Client(base_url=url, timeout=120) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert client.post("/v1/completions", json={**LONG, "max_tokens": 4}).status_code == 200
        bodies = [{**LONG, "prompt": f"{i}, {i + 1}, {i + 2},"} for i in range(4)]
        waiting = [pool.submit(client.post, "/v1/completions", json=body) for body in bodies]
        time.sleep(1.0)
        pid = engine_pid(trainer)
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        answers = [future.result(timeout=30) for future in waiting]
        assert time.monotonic() - started < 15
        assert [a.status_code for a in answers] == [503] * 4, [a.text for a in answers]
        error = answers[0].json()["error"]
        assert error["type"] == "server_error" and "engine process stopped" in error["message"]
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error" and "signal 9" in health.json()["error"]
        again = client.post("/v1/completions", json={**LONG, "max_tokens": 4})
        assert again.status_code == 503
        assert client.get("/checkpoints").status_code == 200  # what needs no model still answers


def test_the_engine_process_ends_with_the_service(trainer_model_dir, tmp_path):
    env = {"TRAINER_ENGINE_PROCESS": "true"}
    stopped = TrainerProcess(checkpoint_dir=tmp_path / "a", env=env).start()
    pid = engine_pid(stopped)
    stopped.stop()  # SIGTERM to the process group: the engine ignores it, uvicorn's shutdown closes it in order
    assert wait_gone(pid)
    assert "engine process stopped" not in stopped.log_tail(20_000)  # not mistaken for a crash
    killed = TrainerProcess(checkpoint_dir=tmp_path / "b", env=env).start()
    try:
        pid = engine_pid(killed)
        os.kill(killed.service.proc.pid, signal.SIGKILL)  # no shutdown at all: the engine sees its pipe close
        assert wait_gone(pid)
    finally:
        killed.stop()
