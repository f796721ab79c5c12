"""The FastAPI app in-process: bearer auth, and a clear /health when the model cannot load."""

import time

import pytest

pytest.importorskip("transformers")
from fastapi.testclient import TestClient

from services.trainer.api import create_app
from services.trainer.settings import TrainerSettings


def wait_loaded(client, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = client.get("/health")
        if health.json().get("status") != "loading":
            return health
        time.sleep(0.2)
    raise TimeoutError("still loading")


def test_bearer_token_guards_every_route_but_health(tiny_random_model_dir, tmp_path):
    settings = TrainerSettings(
        model_source=str(tiny_random_model_dir), checkpoint_dir=tmp_path, api_token="sekret", lora_r=2
    )
    with TestClient(create_app(settings)) as client:
        assert wait_loaded(client).status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_a_missing_model_is_reported_on_health_and_routes_answer_503(tmp_path):
    settings = TrainerSettings(model_source=str(tmp_path / "nowhere.gguf"), checkpoint_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        health = wait_loaded(client)
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "GGUF file not found" in health.json()["error"]
        response = client.post("/v1/completions", json={"model": "student", "prompt": "hi"})
        assert response.status_code == 503 and "GGUF file not found" in response.json()["error"]["message"]


def _chunks(total: int, size: int = 64 * 1024):
    async def gen():
        for start in range(0, total, size):
            yield b"x" * min(size, total - start)

    return gen()


async def test_request_bodies_over_the_limit_get_413_with_or_without_content_length(tmp_path):
    import httpx

    # No lifespan: the model never loads, so a body under the limit reaches the route and gets 503.
    settings = TrainerSettings(model_source=str(tmp_path / "nowhere.gguf"), max_request_bytes=4096)
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://trainer") as client:
        declared = await client.post(
            "/grpo/step", content=b"x" * 5000, headers={"content-type": "application/json"}
        )
        assert declared.status_code == 413
        assert "4096 bytes (TRAINER_MAX_REQUEST_BYTES)" in declared.json()["detail"]
        streamed = await client.post(
            "/grpo/step", content=_chunks(20000), headers={"content-type": "application/json"}
        )
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413 and "4096 bytes" in streamed.json()["detail"]
        small = await client.post("/grpo/step", json={"items": []})
        assert small.status_code != 413


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "ok/../../x", "a\\..\\b"]
)
async def test_checkpoint_names_that_could_escape_the_folder_get_422(tmp_path, name):
    import httpx

    # Checked on the request model, before the engine is needed: the model never loads here.
    settings = TrainerSettings(model_source=str(tmp_path / "nowhere.gguf"), checkpoint_dir=tmp_path)
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://trainer") as client:
        for route in ("/checkpoints", "/checkpoints/load"):
            response = await client.post(route, json={"name": name})
            assert response.status_code == 422 and response.json()["error"]["param"] == "name"


@pytest.mark.parametrize("updates", [0, 17, 2.5, "two"])
async def test_a_bad_number_of_updates_gets_422_naming_the_field(tmp_path, updates):
    import httpx

    # Checked on the request model, before the engine is needed: the model never loads here.
    settings = TrainerSettings(model_source=str(tmp_path / "nowhere.gguf"), checkpoint_dir=tmp_path)
    transport = httpx.ASGITransport(app=create_app(settings))
    item = {"prompt": "a", "completion": " b", "advantage": 1.0}
    async with httpx.AsyncClient(transport=transport, base_url="http://trainer") as client:
        response = await client.post("/grpo/step", json={"items": [item], "loss": {"updates": updates}})
        assert response.status_code == 422 and response.json()["error"]["param"] == "loss.updates"
        accepted = await client.post("/grpo/step", json={"items": [item], "loss": {"updates": 16}})
        assert accepted.status_code == 503  # valid: it reaches the engine, which has no model here


def test_every_dependency_and_route_runs_on_the_event_loop():
    """FastAPI runs a plain `def` dependency or endpoint in its thread pool: a hand-off to a worker thread and back
    per request, contending for the GIL with the decode thread (~7% of it at 255 requests in flight, issue #20)."""
    import inspect

    from fastapi.routing import APIRoute

    from services.trainer.api import checkpoint_routes, health_routes, openai_routes, training_routes

    sync = []

    def walk(dependant, where):
        for dependency in dependant.dependencies:
            if dependency.call is not None and not inspect.iscoroutinefunction(dependency.call):
                sync.append(f"{where}: {dependency.call.__name__}")
            walk(dependency, where)

    # The routers create_app includes.
    modules = (health_routes, openai_routes, training_routes, checkpoint_routes)
    routes = [route for module in modules for route in module.router.routes if isinstance(route, APIRoute)]
    assert len(routes) >= 8
    for route in routes:
        if not inspect.iscoroutinefunction(route.endpoint):
            sync.append(f"{route.path}: the endpoint {route.endpoint.__name__}")
        walk(route.dependant, route.path)
    assert sync == []


def test_the_http_parser_setting_picks_uvicorns_parser(monkeypatch):
    import uvicorn.config

    from services.trainer.__main__ import http_parser

    assert TrainerSettings().http_parser == "auto"
    assert http_parser("auto") == "httptools"  # a dependency of the project (pyproject.toml)
    assert http_parser("h11") == "h11"
    for name in ("auto", "h11", "httptools"):  # uvicorn knows each value the service passes
        assert http_parser(name) in uvicorn.config.HTTP_PROTOCOLS
    monkeypatch.setenv("TRAINER_HTTP_PARSER", "h2")
    with pytest.raises(ValueError):
        TrainerSettings()
