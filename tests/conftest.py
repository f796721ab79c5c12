"""Fixtures shared by every test module. Append new fixtures; do not remove others'."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO_ROOT.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"GSM8K jsonl not found at {GSM8K_DIR} (../shared/data/gsm8k beside the repo)")
    return GSM8K_DIR


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
