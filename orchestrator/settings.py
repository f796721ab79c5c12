"""The orchestrator's one settings object, read from the environment (and an optional config file).

Precedence: explicit constructor arguments > environment variables > the config file named by
AZT_CONFIG_FILE (JSON or TOML) > the defaults below. Secrets are `SecretStr`, so printing the settings
masks them.

Teacher endpoints come from TEACHER_TIER:
- "embedded": the trainer service's own "base" model is teacher and checker (no GPU, no Docker).
- "local": the vLLM containers of compose.yaml.
- "free" / "production": OpenRouter model lists.
- "custom": the TEACHERS JSON list.

The search's knobs are defined once, in `SearchConfig` (default, bounds, description): the service settings
(MAX_TREE_DEPTH, NUM_MCTS_ITERATIONS, MAX_TOKENS, CHUNK_TOKENS), the API's `SearchParams` and the CLI's flags
take theirs from it (`field_constraints`). Its defaults are the training recipe of docs/learning-design.md
(issue #19): the forked whole-answer search (search/fork.py), 4 answers + 2 forks x 2 continuations = 8 student
rows per problem at temperature 1.0, answers of up to 256 tokens, correctness as the reward with the dense terms
capped as tie-breaks, no LLM checker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

TeacherTier = Literal["embedded", "local", "free", "production", "custom"]


def field_constraints(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The bounds (ge, le, gt, lt, ...) and description of `model.<name>`, to give another field the same ones."""
    info = model.model_fields[name]
    bounds = {
        key: value
        for constraint in info.metadata
        if dataclasses.is_dataclass(constraint) and not isinstance(constraint, type)
        for key, value in dataclasses.asdict(constraint).items()
    }
    return {**bounds, "description": info.description}


class RewardWeights(BaseModel):
    """Weights of a search path's reward terms (search/rewards.py has the formula).

    Correctness first (issue #19): HRE 1 and PRE 0 by default; the dense terms (PRE, length, direction) together
    are clipped to +-dense_cap, and dense_cap must stay below hre / 2, so a correct answer always scores above a
    wrong one and the dense terms only break ties. (The original's weights were 0.4 HRE / 0.6 PRE, uncapped: on
    the student's own text PRE then decided most advantages, and the GPU runs of that recipe collapsed.)"""

    hre: float = Field(default=1.0, ge=0, le=100, description="weight of the hard reward (correct answer)")
    pre: float = Field(default=0.0, ge=0, le=100, description="weight of the accumulated process reward")
    length_penalty: float = Field(default=-0.01, ge=-10, le=10, description="per step (line) of depth")
    right_bonus: float = Field(default=0.1, ge=-10, le=10, description="per teacher 'right' step on the path")
    wrong_bonus: float = Field(
        default=-0.05, ge=-10, le=10, description="per teacher 'wrong' step on the path"
    )
    discount: float = Field(default=0.95, ge=0, le=1, description="of the accumulated process reward")
    dense_cap: float = Field(
        default=0.1,
        ge=0,
        le=100,
        description="the dense terms (PRE, length, direction) together are clipped to +-dense_cap; below hre/2 "
        "(when hre > 0), so they can never outweigh correctness",
    )

    @model_validator(mode="after")
    def _correctness_dominates(self) -> RewardWeights:
        if self.hre > 0 and self.dense_cap >= self.hre / 2:
            raise ValueError(
                f"dense_cap ({self.dense_cap:g}) must be below hre / 2 ({self.hre / 2:g}): the dense terms must "
                "never outweigh a correct answer"
            )
        return self


SearchShape = Literal["fork", "line"]


class SearchConfig(BaseModel):
    """How one search tree grows: every knob of the search, its default and its bounds.

    Two shapes share the knobs. "fork" (search/fork.py, the default): AlphaZero-style at whole-answer
    granularity; round 0 is `root_samples` whole student answers, then `iterations` forks, `parallel_simulations`
    per round, each a line picked by PUCT and continued by `n_student` student samples (and the teachers'
    rest-of-answer requests) in one request. "line" (search/mcts.py): the line-by-line MCTS for model teachers that
    write one step at a time (one line per node, rollouts, /logprobs priors); it was the default before issue #19,
    with max_depth 6, iterations 8, parallel_simulations 4, max_tokens 1024, chunk_tokens 64, n_teacher_wrong 1,
    temperature 0.8 and the checker on."""

    shape: SearchShape = Field(
        default="fork",
        description="fork: whole answers forked at lines chosen by PUCT (the default); line: the line-by-line "
        "MCTS (one step per node, rollouts), for model teachers that write one step at a time",
    )
    max_depth: int = Field(default=6, ge=1, le=64, description="line: deepest reasoning step of a path")
    iterations: int = Field(
        default=2,
        ge=0,
        le=4096,
        description="simulations per problem; fork: forks per tree (0 = the root's answers only, plain GRPO "
        "sampling); line: MCTS simulations",
    )
    max_tokens: int = Field(
        default=256, ge=16, le=65536, description="token budget of one answer (search path)"
    )
    chunk_tokens: int = Field(default=64, ge=4, le=4096, description="line: cap of one reasoning step")
    parallel_simulations: int = Field(
        default=2,
        ge=1,
        le=256,
        description="simulations selected at once; fork: forks per round (a round's requests go out together); "
        "line: simulations of one tree at once",
    )
    selection: Literal["puct", "uct"] = Field(default="puct", description="line: child selection rule")
    c_puct: float = Field(default=1.5, gt=0, le=100, description="exploration constant of PUCT")
    c_uct: float = 1.414
    virtual_loss: float = 1.0  # the value each pending visit pretends to lose
    fpu: float = 0.0  # Q of an unvisited child
    root_samples: int = Field(
        default=4, ge=0, le=64, description="fork: the student's whole answers from the question (round 0)"
    )
    n_teacher_right: int = Field(
        default=1,
        ge=0,
        le=64,
        description="'right' teacher samples per expansion (fork: rest-of-answer continuations per fork)",
    )
    n_teacher_wrong: int = Field(
        default=0,
        ge=0,
        le=64,
        description="'wrong' teacher samples per expansion (fork: rest-of-answer continuations per fork)",
    )
    n_student: int = Field(
        default=2,
        ge=0,
        le=64,
        description="student samples per expansion (fork: continuations of the selected line; line: next steps)",
    )
    teacher_gold: bool = Field(
        default=True,
        description="fork: a tree in which no answer written by the student alone is right after its last round "
        "gets the 'right' teacher's whole answer from the question (GCPO): the worked solution of a problem the "
        "student did not solve (a right teacher continuation of a student prefix does not count)",
    )
    temperature: float = Field(default=1.0, ge=0, le=2, description="student sampling temperature")
    teacher_temperature: float = Field(default=0.7, ge=0, le=2, description="teacher sampling temperature")
    prior_temperature: float = Field(
        default=1.0, gt=0, le=100, description="softmax temperature of the priors (log-probs or surprisal)"
    )
    rollout: bool = Field(
        default=True,
        description="line: evaluate open children by a student rollout to an answer (else PRE/length terms "
        "only)",
    )
    rollouts: Literal["best", "all"] = "best"  # which open children of an expansion are evaluated
    rollout_max_tokens: int = Field(
        default=256, ge=1, le=65536, description="line: token budget of a rollout"
    )
    use_checker: bool = Field(
        default=False,
        description="ask the LLM checker when the rules are unsure (fork: of an answer cut by the token budget)",
    )
    max_expand_failures: int = 2  # then the leaf becomes terminal ("expansion_failed")
    seed: int | None = Field(default=None, description="seed of the sampling requests")
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    one_line_steps: bool = Field(
        default=True,
        description="line: steps end at a newline (default); false: the student and the teachers write on to the "
        "end of the answer, so max_depth 1 with no teacher children is plain GRPO sampling, and with a 'right' "
        "teacher its whole answer joins the student's group",
    )
    teacher_reference: bool = Field(
        default=False,
        description="show the 'right' teacher the problem's gold solution as a hint (train problems only; "
        "default off)",
    )

    def student_rows(self) -> int:
        """Student samples per problem: fork = root answers + forks x continuations (the GRPO group)."""
        if self.shape == "fork":
            return self.root_samples + self.iterations * self.n_student
        return self.iterations * self.n_student

    def max_nodes(self) -> int:
        """An upper bound of one tree's nodes (MAX_TREE_NODES bounds it): fork = one node per line of every
        answer, a line holding at least one token; line = 1 + iterations x children per expansion."""
        width = self.n_teacher_right + self.n_teacher_wrong + self.n_student
        if self.shape == "fork":
            answers = self.root_samples + self.iterations * width + int(self.teacher_gold)
            return 1 + answers * self.max_tokens
        return 1 + self.iterations * width

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SearchConfig:
        """The service's defaults (MAX_TREE_DEPTH, NUM_MCTS_ITERATIONS, ...) with `overrides` over them."""
        base = {
            "max_depth": settings.max_tree_depth,
            "iterations": settings.num_mcts_iterations,
            "max_tokens": settings.max_tokens,
            "chunk_tokens": settings.chunk_tokens,
        }
        return cls(**{**base, **overrides})


# The line search as it ran by default before issue #19 (`SearchConfig(**LINE_SEARCH)`): 6-line-deep trees of
# 8 simulations, 4 at once, 64-token lines, a "right" and a "wrong" teacher line and 2 student lines per
# expansion, a rollout per expansion, the LLM checker. bench/search_throughput.py's line phases and the line
# search's tests use it.
LINE_SEARCH: dict[str, Any] = {
    "shape": "line",
    "max_depth": 6,
    "iterations": 8,
    "parallel_simulations": 4,
    "max_tokens": 1024,
    "chunk_tokens": 64,
    "n_teacher_right": 1,
    "n_teacher_wrong": 1,
    "n_student": 2,
    "temperature": 0.8,
    "use_checker": True,
}


def _search_default(name: str) -> Any:
    """A settings field with the default, bounds and description of SearchConfig.<name>."""
    return Field(default=SearchConfig.model_fields[name].default, **field_constraints(SearchConfig, name))


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
    {
        "name": "llama-3.1-8b",
        "base_url": "http://teacher-llama:8000/v1",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
    },
    {
        "name": "mistral-7b",
        "base_url": "http://teacher-mistral:8000/v1",
        "model": "mistralai/Mistral-7B-Instruct-v0.3",
    },
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
    # The student's model name at the trainer; on a student server (STUDENT_URL) the prefix of its adapter
    # versions' names, "<student_model>-v<N>".
    student_model: str = "student"
    # A student server that loads LoRA adapters at runtime (vLLM with --enable-lora and
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), with the OpenAI base URL (ending in /v1); None = the trainer serves the
    # student. The trainer must write its adapters where that server reads them (TRAINER_ADAPTER_EXPORT_DIR).
    student_url: str | None = None
    student_api_key_env: str | None = None  # the environment variable holding the student server's key
    # TRAINER_ADAPTER_EXPORT_DIR as the student server sees it; None = the trainer's paths are valid there.
    student_adapter_dir: str | None = None
    # How long a train job waits for an unreachable student server (killed, restarting) before it fails; the step
    # whose search it spoiled is searched again once the server is back with the current adapter.
    student_wait_s: float = Field(default=600.0, ge=0)
    # GRPO items whose student text is more than this many adapter versions behind the version a step updates (or
    # from a version a rewind abandoned) are dropped before the step (runners/off_policy.py says when that happens).
    max_off_policy_versions: int = Field(default=1, ge=0, le=1_000_000)
    teacher_tier: TeacherTier = "embedded"
    teachers: list[EndpointSpec] | None = None  # used when teacher_tier == "custom"
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    openrouter_api_key: SecretStr | None = None
    checker_url: str | None = None  # default: the trainer's /v1 in the embedded tier
    checker_model: str = "base"
    checker_api_key_env: str | None = None
    endpoint_max_concurrency: int = Field(default=32, ge=1, le=4096)
    # The student's server (the trainer, or vLLM) batches what it is sent: every tree of a step asks at once.
    student_max_concurrency: int = Field(default=256, ge=1, le=4096)
    request_timeout_s: float = Field(default=120.0, gt=0)
    # A teacher that failed twice in a row rests this long before it is asked again (doubled for each rest in a
    # row, at most 600 s); its failure rate lowers its pick weight meanwhile (search/teachers.py).
    teacher_cooldown_s: float = Field(default=30.0, ge=0)
    # How long a train job waits for an unreachable trainer (kill -9, restart) before it fails.
    trainer_wait_s: float = Field(default=600.0, ge=0)

    # --- search defaults (a request may override within limits) -----------------------------------------
    max_tree_depth: int = _search_default("max_depth")
    num_mcts_iterations: int = _search_default("iterations")
    max_tokens: int = _search_default("max_tokens")
    chunk_tokens: int = _search_default("chunk_tokens")
    # A train step grows its batch's trees at once (trees_in_flight defaults to the batch), at most this many.
    max_trees_in_flight: int = Field(default=256, ge=1, le=1024)
    max_requests_in_flight: int = Field(default=512, ge=1, le=8192)
    # Nodes one search tree may grow (1 + iterations x (n_teacher_right + n_teacher_wrong + n_student)); a /train
    # asking for more, or for more trees_in_flight than MAX_TREES_IN_FLIGHT, gets 422 (bounds the job's memory).
    max_tree_nodes: int = Field(default=32768, ge=16)

    # --- service ---------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_token: SecretStr | None = None
    data_dir: Path = Path("runs")
    db_path: Path | None = None  # default: data_dir / "jobs.sqlite"
    gsm8k_path: str | None = None  # local jsonl folder; None = the hub when reachable, else the shipped copy
    max_concurrent_jobs: int = Field(default=1, ge=1, le=64)
    max_queued_jobs: int = Field(
        default=16, ge=0, le=4096
    )  # beyond running + this many, /train and /eval get 429
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)  # larger request bodies get 413
    # Seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive). Longer than clients keep
    # idle connections (httpx and the openai client 5 s, aiohttp 15 s, the orchestrator's transport 30 s), so
    # the client always closes first: at uvicorn's default of 5 s a client reusing a connection as the server
    # closed it lost its request to a reset (bench/RESULTS.md, "Reliability": 1 in ~3,000 requests at 255
    # concurrent clients on loopback, 0 in ~6,600 at 75 s).
    keep_alive_s: int = Field(default=75, ge=1)
    max_event_streams: int = Field(default=256, ge=1)  # open GET /jobs/{id}/events streams; more get 429
    # Retention of finished (completed, failed, cancelled) jobs: their records, events, steps and folder (trees,
    # reports) are deleted past the newest JOB_RETENTION_COUNT and once finished JOB_RETENTION_DAYS ago (0 = no
    # such limit); checked at start-up and whenever a job ends. Queued, running and interrupted jobs are kept.
    job_retention_count: int = Field(default=200, ge=0)
    job_retention_days: float = Field(default=0.0, ge=0)
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
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
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
            return [
                EndpointSpec(
                    name="embedded-base", base_url=self.trainer_v1, model="base", tier=tier, **common
                )
            ]
        if tier == "local":
            return [EndpointSpec(**t, tier=tier, **common) for t in LOCAL_TEACHERS]
        if tier in OPENROUTER_MODELS:
            return [
                EndpointSpec(
                    name=m.split("/")[-1],
                    base_url=self.openrouter_base_url,
                    model=m,
                    api_key_env="OPENROUTER_API_KEY",
                    tier=tier,
                    **common,
                )
                for m in OPENROUTER_MODELS[tier]
            ]
        if not self.teachers:
            raise ValueError(
                "TEACHER_TIER=custom needs TEACHERS, a JSON list of {name, base_url, model, api_key_env}"
            )
        return [t.model_copy(update={"tier": t.tier or "custom"}) for t in self.teachers]

    def checker_endpoint(self) -> EndpointSpec:
        url = self.checker_url or self.trainer_v1
        return EndpointSpec(
            name="checker",
            base_url=url,
            model=self.checker_model,
            api_key_env=self.checker_api_key_env,
            max_concurrency=self.endpoint_max_concurrency,
            timeout_s=self.request_timeout_s,
        )

    def student_server(self) -> EndpointSpec | None:
        """The student server with runtime LoRA loading (STUDENT_URL), or None when the trainer serves."""
        if not self.student_url:
            return None
        return EndpointSpec(
            name="student-server",
            base_url=self.student_url,
            model=self.student_model,
            api_key_env=self.student_api_key_env,
            max_concurrency=self.student_max_concurrency,
            timeout_s=self.request_timeout_s,
        )

    def student_endpoint(self) -> EndpointSpec:
        return EndpointSpec(
            name="student",
            base_url=self.trainer_v1,
            model=self.student_model,
            max_concurrency=self.student_max_concurrency,
            timeout_s=self.request_timeout_s,
        )
