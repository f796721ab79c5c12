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
