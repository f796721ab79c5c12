"""The orchestrator's one settings object, read from the environment (and an optional config file).

Precedence: explicit constructor arguments > environment variables > the config file named by
AZT_CONFIG_FILE (JSON or TOML) > the defaults below. Secrets are `SecretStr`, so printing the settings
masks them.

Teacher endpoints come from TEACHER_TIER:
- "embedded": the trainer service's own "base" model is teacher and checker (no GPU, no Docker).
- "local": the vLLM containers of compose.yaml.
- "free" / "production": OpenRouter model lists.
- "custom": the TEACHERS JSON list.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

TeacherTier = Literal["embedded", "local", "free", "production", "custom"]


class EndpointSpec(BaseModel):
    """One OpenAI-compatible server and the model to ask there.

    The key itself never lives here: `api_key_env` names the environment variable that holds it.
    """

    name: str
    base_url: str  # including the /v1 suffix, as OpenAI clients expect
    model: str
    api_key_env: str | None = None
    tier: str | None = None
    max_concurrency: int = Field(default=32, ge=1, le=4096)
    timeout_s: float = Field(default=120.0, gt=0)


# The model lists of the original's tiers. "local" names match the services in compose.yaml.
LOCAL_TEACHERS: list[dict[str, Any]] = [
    {"name": "qwen2.5-7b", "base_url": "http://teacher-qwen:8000/v1", "model": "Qwen/Qwen2.5-7B-Instruct"},
    {"name": "llama-3.1-8b", "base_url": "http://teacher-llama:8000/v1", "model": "meta-llama/Llama-3.1-8B-Instruct"},
    {"name": "mistral-7b", "base_url": "http://teacher-mistral:8000/v1", "model": "mistralai/Mistral-7B-Instruct-v0.3"},
    {"name": "gemma-2-9b", "base_url": "http://teacher-gemma:8000/v1", "model": "google/gemma-2-9b-it"},
]
OPENROUTER_MODELS: dict[str, list[str]] = {
    "free": ["deepseek/deepseek-r1-distill-qwen-32b:free", "nvidia/nemotron-nano-9b-v2:free"],
    "production": ["qwen/qwen-2.5-72b-instruct", "meta-llama/llama-3.3-70b-instruct"],
}


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Defaults from the file named by AZT_CONFIG_FILE; the environment still wins over it."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None):
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"AZT_CONFIG_FILE={path!r} does not exist")
            text = p.read_text()
            raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
            self._data = {k.lower(): v for k, v in raw.items()}

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # --- endpoints -------------------------------------------------------------------------------------
    trainer_url: str = "http://127.0.0.1:8001"
    student_model: str = "student"
    teacher_tier: TeacherTier = "embedded"
    teachers: list[EndpointSpec] | None = None  # used when teacher_tier == "custom"
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    openrouter_api_key: SecretStr | None = None
    checker_url: str | None = None  # default: the trainer's /v1 in the embedded tier
    checker_model: str = "base"
    checker_api_key_env: str | None = None
    endpoint_max_concurrency: int = Field(default=32, ge=1, le=4096)
    request_timeout_s: float = Field(default=120.0, gt=0)
    # How long a train job waits for an unreachable trainer (kill -9, restart) before it fails.
    trainer_wait_s: float = Field(default=600.0, ge=0)

    # --- search defaults (a request may override within limits) -----------------------------------------
    max_tree_depth: int = Field(default=6, ge=1, le=64)
    num_mcts_iterations: int = Field(default=8, ge=1, le=4096)
    max_tokens: int = Field(default=1024, ge=16, le=65536)  # token budget of one search path
    chunk_tokens: int = Field(default=64, ge=4, le=4096)  # cap of one reasoning step
    max_trees_in_flight: int = Field(default=8, ge=1, le=1024)
    max_requests_in_flight: int = Field(default=64, ge=1, le=8192)
    # Nodes one search tree may grow (1 + iterations x (n_teacher_right + n_teacher_wrong + n_student)); a /train
    # asking for more, or for more trees_in_flight than MAX_TREES_IN_FLIGHT, gets 422 (bounds the job's memory).
    max_tree_nodes: int = Field(default=32768, ge=16)

    # --- service ---------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_token: SecretStr | None = None
    data_dir: Path = Path("runs")
    db_path: Path | None = None  # default: data_dir / "jobs.sqlite"
    gsm8k_path: str | None = None  # local jsonl folder; None = the hub (openai/gsm8k "main")
    max_concurrent_jobs: int = Field(default=1, ge=1, le=64)
    max_queued_jobs: int = Field(default=16, ge=0, le=4096)  # beyond running + this many, /train and /eval get 429
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)  # larger request bodies get 413
    max_event_streams: int = Field(default=256, ge=1)  # open GET /jobs/{id}/events streams; more get 429
    wandb_project: str | None = None
    wandb_api_key: SecretStr | None = None

    @field_validator("teachers", mode="before")
    @classmethod
    def _parse_teachers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value else None
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        import os

        file_source = _ConfigFileSource(settings_cls, os.environ.get("AZT_CONFIG_FILE"))
        return (init_settings, env_settings, dotenv_settings, file_source, file_secret_settings)

    # --- derived ---------------------------------------------------------------------------------------
    @property
    def trainer_v1(self) -> str:
        return self.trainer_url.rstrip("/") + "/v1"

    @property
    def resolved_db_path(self) -> Path:
        return self.db_path or self.data_dir / "jobs.sqlite"

    def teacher_endpoints(self) -> list[EndpointSpec]:
        """The teacher list the chosen tier stands for."""
        common = {"max_concurrency": self.endpoint_max_concurrency, "timeout_s": self.request_timeout_s}
        tier = self.teacher_tier
        if tier == "embedded":
            return [EndpointSpec(name="embedded-base", base_url=self.trainer_v1, model="base", tier=tier, **common)]
        if tier == "local":
            return [EndpointSpec(**t, tier=tier, **common) for t in LOCAL_TEACHERS]
        if tier in OPENROUTER_MODELS:
            return [
                EndpointSpec(name=m.split("/")[-1], base_url=self.openrouter_base_url, model=m,
                             api_key_env="OPENROUTER_API_KEY", tier=tier, **common)
                for m in OPENROUTER_MODELS[tier]
            ]
        if not self.teachers:
            raise ValueError("TEACHER_TIER=custom needs TEACHERS, a JSON list of {name, base_url, model, api_key_env}")
        return [t.model_copy(update={"tier": t.tier or "custom"}) for t in self.teachers]

    def checker_endpoint(self) -> EndpointSpec:
        url = self.checker_url or self.trainer_v1
        return EndpointSpec(name="checker", base_url=url, model=self.checker_model,
                            api_key_env=self.checker_api_key_env, max_concurrency=self.endpoint_max_concurrency,
                            timeout_s=self.request_timeout_s)

    def student_endpoint(self) -> EndpointSpec:
        return EndpointSpec(name="student", base_url=self.trainer_v1, model=self.student_model,
                            max_concurrency=self.endpoint_max_concurrency, timeout_s=self.request_timeout_s)
