"""Switching teacher tiers is configuration only: TEACHER_TIER / TEACHERS / OPENROUTER_* in the environment decide
the endpoints the orchestrator asks, and a key given there never shows in the settings' repr or dumps.
(The running service, its logs, job records and /health are checked against real vLLM in
tests/integration/test_vllm_teacher.py.)"""

from __future__ import annotations

import json

import pytest

from orchestrator.settings import LOCAL_TEACHERS, OPENROUTER_MODELS, Settings

SECRET = "sk-or-v1-deploytest-0123456789abcdef"
TIER_VARS = (
    "TEACHER_TIER",
    "TEACHERS",
    "OPENROUTER_BASE_URL",
    "OPENROUTER_API_KEY",
    "CHECKER_URL",
    "CHECKER_MODEL",
    "CHECKER_API_KEY_ENV",
    "TRAINER_URL",
    "AZT_CONFIG_FILE",
)


@pytest.fixture
def env(monkeypatch):
    for name in TIER_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> Settings:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return set_env


def test_embedded_is_the_default_and_uses_the_trainer(env):
    settings = env(TRAINER_URL="http://127.0.0.1:8011")
    (teacher,) = settings.teacher_endpoints()
    assert (teacher.base_url, teacher.model) == ("http://127.0.0.1:8011/v1", "base")
    assert settings.checker_endpoint().base_url == "http://127.0.0.1:8011/v1"


def test_local_tier_points_at_the_compose_services(env):
    settings = env(
        TEACHER_TIER="local", CHECKER_URL="http://checker:8000/v1", CHECKER_MODEL="Qwen/Qwen2.5-0.5B-Instruct"
    )
    got = [(t.base_url, t.model, t.api_key_env) for t in settings.teacher_endpoints()]
    assert got == [(t["base_url"], t["model"], None) for t in LOCAL_TEACHERS]
    checker = settings.checker_endpoint()
    assert (checker.base_url, checker.model) == ("http://checker:8000/v1", "Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.parametrize("tier", ["free", "production"])
def test_openrouter_tiers_follow_the_environment(env, tier):
    settings = env(
        TEACHER_TIER=tier, OPENROUTER_BASE_URL="http://gateway.example:9000/v1", OPENROUTER_API_KEY=SECRET
    )
    teachers = settings.teacher_endpoints()
    assert [t.model for t in teachers] == OPENROUTER_MODELS[tier]
    assert {t.base_url for t in teachers} == {"http://gateway.example:9000/v1"}
    # Endpoints carry the variable's name, never its value.
    assert {t.api_key_env for t in teachers} == {"OPENROUTER_API_KEY"}
    assert SECRET not in json.dumps([t.model_dump() for t in teachers])


def test_custom_tier_takes_teachers_json(env):
    teachers = [
        {"name": "qwen-a", "base_url": "http://10.0.0.5:8000/v1", "model": "Qwen/Qwen2.5-7B-Instruct"},
        {
            "name": "qwen-b",
            "base_url": "http://10.0.0.6:8000/v1",
            "model": "Qwen/Qwen2.5-7B-Instruct",
            "api_key_env": "TEACHER_API_KEY",
            "max_concurrency": 8,
        },
    ]
    settings = env(TEACHER_TIER="custom", TEACHERS=json.dumps(teachers))
    got = settings.teacher_endpoints()
    assert [(t.name, t.base_url, t.api_key_env) for t in got] == [
        ("qwen-a", "http://10.0.0.5:8000/v1", None),
        ("qwen-b", "http://10.0.0.6:8000/v1", "TEACHER_API_KEY"),
    ]
    assert got[1].max_concurrency == 8 and {t.tier for t in got} == {"custom"}


def test_custom_tier_without_teachers_says_what_is_missing(env):
    with pytest.raises(ValueError, match="TEACHERS"):
        env(TEACHER_TIER="custom").teacher_endpoints()


def test_unknown_tier_is_rejected(env):
    with pytest.raises(ValueError, match="teacher_tier"):
        env(TEACHER_TIER="cloud")


def test_keys_are_masked_in_repr_and_dumps(env):
    settings = env(TEACHER_TIER="free", OPENROUTER_API_KEY=SECRET, API_TOKEN="tok-" + SECRET)
    assert settings.openrouter_api_key.get_secret_value() == SECRET
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        json.dumps(settings.model_dump(), default=str),
    ):
        assert SECRET not in text
