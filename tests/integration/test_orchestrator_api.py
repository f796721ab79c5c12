"""The orchestrator as a real process (uvicorn on 127.0.0.1) over the scripted OpenAI-compatible server
standing in for the trainer's /v1 routes: routes, validation, eval jobs end to end, SSE replay, cancel,
restart + resume.
Training end to end against the real trainer lives in test_e2e_train_eval.py."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from pydantic import ValidationError

from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.local.processes import free_port, orchestrator_process
from services.protocol import GrpoStepRequest
from support.scripted_server import ScriptedServer, ServerConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scripted():
    # Every answer ends with "#### 42"; "base" answers 43, so base and student differ.
    with ScriptedServer(ServerConfig(answer="42", answer_depth=1, wrong_models=["base"])) as server:
        yield server


@pytest.fixture(scope="module")
def orchestrator(scripted, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("orch")
    proc = orchestrator_process(free_port(), scripted.url, workdir, env={})
    with proc:
        proc.wait_ready(timeout_s=60)
        yield proc


@pytest.fixture
def client(orchestrator):
    with OrchestratorClient(orchestrator.url) as c:
        yield c


def test_health_docs_and_metrics(client, scripted):
    health = client.health()
    trainer = next(e for e in health["endpoints"] if e["name"] == "trainer")
    assert trainer["ok"] and trainer["url"] == scripted.url + "/health"
    assert health["status"] == "ok"
    assert client.http.get("/docs").status_code == 200
    paths = client.http.get("/openapi.json").json()["paths"]
    for route in (
        "/train",
        "/eval",
        "/jobs",
        "/jobs/{job_id}/events",
        "/jobs/{job_id}/resume",
        "/jobs/{job_id}/trees/{n}",
        "/health",
        "/metrics",
    ):
        assert route in paths
    metrics = client.http.get("/metrics")
    assert metrics.status_code == 200 and "azt_jobs{" in metrics.text


@pytest.mark.parametrize(
    "route, body, field",
    [
        ("/train", {"num_examples": 0}, "num_examples"),
        ("/train", {"search": {"max_depth": 1000}}, "max_depth"),
        ("/train", {"search": {"iterations": -1}}, "iterations"),
        ("/train", {"search": {"root_samples": 65}}, "root_samples"),
        ("/train", {"search": {"shape": "beam"}}, "shape"),
        (
            "/train",
            {"search": {"rewards": {"hre": 0.1}}},
            "dense_cap",
        ),  # tie-breaks could outweigh correctness
        ("/train", {"max_generated_tokens": 0}, "max_generated_tokens"),
        ("/train", {"search": {"max_tokens": 10**7}}, "max_tokens"),
        ("/eval", {"max_tokens": 5}, "max_tokens"),
        ("/eval", {"models": ["gpt"]}, "models"),
        ("/eval", {"num_examples": 10, "offset": 1315}, "exceeds"),
    ],
)
def test_invalid_requests_get_422_naming_the_field(client, route, body, field):
    response = client.http.post(route, json=body)
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    "loss, field",
    [
        ({"clip_eps": 2}, "clip_eps"),
        ({"clip_eps": 1.0}, "clip_eps"),  # the clipped ratio's lower end 1 - clip_eps must stay positive
        ({"learning_rate": 2}, "learning_rate"),
        ({"beta": 11}, "beta"),
        ({"clip_eps_high": 20}, "clip_eps_high"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
        ({"type": "ppo"}, "type"),
        ({"clip_eps_hi": 0.3}, "clip_eps_hi"),
        ({"updates": 17}, "updates"),
    ],
)
def test_a_loss_the_trainer_would_refuse_gets_422_at_submission(client, loss, field):
    """/train takes the trainer's own loss settings: what /grpo/step would refuse after a whole search batch is
    refused when the job is submitted, naming the field."""
    with pytest.raises(ValidationError):  # the trainer's side of the same contract
        GrpoStepRequest.model_validate(
            {"items": [{"prompt": "p", "completion": "c", "advantage": 1}], "loss": loss}
        )
    response = client.http.post("/train", json={"num_examples": 1, "loss": loss})
    assert response.status_code == 422
    assert ["body", "loss", field] in [error["loc"] for error in response.json()["detail"]]


def test_a_loss_the_trainer_accepts_is_taken_and_its_bounds_are_documented(client):
    loss = {
        "type": "dr_grpo",
        "beta": 0.0,
        "clip_eps": 0.3,
        "clip_eps_high": 0.28,
        "learning_rate": 1e-5,
        "updates": 4,
    }
    response = client.http.post("/train", json={"num_examples": 1, "loss": loss})
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert loss.items() <= client.job(job_id)["request"]["loss"].items()  # with the defaults of the rest
    client.wait(job_id, timeout_s=60, poll_s=0.1)  # (it fails: the scripted server has no /checkpoints)

    schemas = client.http.get("/openapi.json").json()["components"]["schemas"]
    bounds = schemas["RecipeLoss"]["properties"]  # the trainer's LossSettings with the recipe's defaults
    assert bounds["clip_eps"]["exclusiveMaximum"] == 1.0 and bounds["beta"]["maximum"] == 10.0
    learning_rate = bounds["learning_rate"]["anyOf"][0]  # float | None
    assert (learning_rate["exclusiveMinimum"], learning_rate["maximum"]) == (0.0, 1.0)
    assert (bounds["updates"]["minimum"], bounds["updates"]["maximum"], bounds["updates"]["default"]) == (
        1,
        16,
        1,
    )
    defaults = {name: bounds[name]["default"] for name in ("type", "beta", "clip_eps_high", "learning_rate")}
    assert defaults == {"type": "dr_grpo", "beta": 0.0, "clip_eps_high": 0.28, "learning_rate": 5e-4}


def test_unknown_job_is_404(client):
    assert client.http.get("/jobs/nope").status_code == 404
    assert client.http.get("/jobs/nope/events").status_code == 404
    assert client.http.post("/jobs/nope/resume").status_code == 404


def test_eval_job_end_to_end_with_events_and_results(client):
    response = client.http.post("/eval", json={"num_examples": 4, "offset": 10, "max_tokens": 32})
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    events = list(client.follow(job_id))
    types = [e.type for e in events]
    assert [e.data["status"] for e in events if e.type == "status"] == ["queued", "running", "completed"]
    assert types.count("answer") == 8
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    job = client.job(job_id)
    assert job["status"] == "completed" and job["progress"]["done"] == 8
    report = job["result"]
    rows = client.results(job_id)
    assert len(rows) == 8 and {r["model"] for r in rows} == {"base", "student"}
    for model in ("base", "student"):
        mrows = [r for r in rows if r["model"] == model]
        assert report["models"][model]["strict_correct"] == sum(r["strict_correct"] for r in mrows)
        assert report["models"][model]["flexible_acc"] == sum(r["flexible_correct"] for r in mrows) / len(
            mrows
        )
    assert all(r["strict_pred"] == ("43" if r["model"] == "base" else "42") for r in rows)
    assert "p_value" in report["comparison"]["strict"]
    assert client.http.get(f"/jobs/{job_id}/files/report.png").content.startswith(b"\x89PNG")
    assert "GSM8K eval" in client.http.get(f"/jobs/{job_id}/files/report.html").text
    assert client.http.get(f"/jobs/{job_id}/files/..%2Fjobs.sqlite").status_code == 404

    # Replay from an event id: only the later events, the same ones.
    middle = ids[len(ids) // 2]
    replay = list(client.follow(job_id, after=middle))
    assert [e.id for e in replay] == [i for i in ids if i > middle]
    with client.http.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[-2])}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    assert body.count("id: ") == 1 and f"id: {ids[-1]}" in body

    assert client.http.post(f"/jobs/{job_id}/resume").status_code == 409  # completed jobs are not resumed
    assert any(j["id"] == job_id for j in client.jobs())


def test_cancel_a_running_job(client, scripted):
    scripted.config.latency_ms = 500
    try:
        job_id = client.eval(num_examples=40, concurrency=2, max_tokens=32)
        for event in client.follow(job_id):
            if event.type == "answer":
                break
        job = client.cancel(job_id)
        assert job["status"] == "cancelled"
        assert client.job(job_id)["progress"]["done"] < 80
        assert client.http.post(f"/jobs/{job_id}/cancel").status_code == 409
    finally:
        scripted.config.latency_ms = 0


def test_restart_marks_running_jobs_interrupted_and_resume_finishes_them(scripted, tmp_path):
    port = free_port()
    env: dict[str, str] = {}
    scripted.config.latency_ms = 300
    try:
        first = orchestrator_process(port, scripted.url, tmp_path, env=env).start()
        first.wait_ready(timeout_s=60)
        with OrchestratorClient(first.url) as client:
            job_id = client.eval(num_examples=30, concurrency=2, max_tokens=32)
            for event in client.follow(job_id):
                if event.type == "answer":
                    break
            first.kill()  # SIGKILL mid-job, as a crash would

        second = orchestrator_process(port, scripted.url, tmp_path, env=env).start()
        try:
            second.wait_ready(timeout_s=60)
            scripted.config.latency_ms = 0
            with OrchestratorClient(second.url) as client:
                job = client.job(job_id)
                assert job["status"] == "interrupted"
                assert client.http.post(f"/jobs/{job_id}/resume").status_code == 202
                job = client.wait(job_id, timeout_s=120)
                assert job["status"] == "completed"
                assert len(client.results(job_id)) == 60
                statuses = [e.data["status"] for e in client.follow(job_id) if e.type == "status"]
                assert statuses[-4:] == ["interrupted", "queued", "running", "completed"]
        finally:
            second.stop()
    finally:
        scripted.config.latency_ms = 0


def test_api_token_guards_everything_but_health(scripted, tmp_path):
    proc = orchestrator_process(free_port(), scripted.url, tmp_path, env={"API_TOKEN": "s3cret"})
    with proc:
        proc.wait_ready(timeout_s=60)
        assert httpx.get(proc.url + "/jobs").status_code == 401
        assert httpx.post(proc.url + "/eval", json={}).status_code == 401
        assert httpx.get(proc.url + "/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(proc.url + "/health").status_code == 200


def test_sigterm_with_an_open_event_stream_stops_promptly_and_interrupts_the_job(scripted, tmp_path):
    import threading

    from orchestrator.jobs.store import JobStore

    scripted.config.latency_ms = 300
    proc = orchestrator_process(free_port(), scripted.url, tmp_path, env={})
    try:
        proc.start()
        proc.wait_ready(timeout_s=60)
        with OrchestratorClient(proc.url) as client:
            job_id = client.eval(num_examples=30, concurrency=1, max_tokens=32)
            seen = threading.Event()

            def listen():  # an SSE client that stays connected
                try:
                    with httpx.stream("GET", f"{proc.url}/jobs/{job_id}/events", timeout=None) as r:
                        for line in r.iter_lines():
                            if line.startswith("event: answer"):
                                seen.set()
                except httpx.HTTPError:
                    pass

            threading.Thread(target=listen, daemon=True).start()
            assert seen.wait(30)
        proc.stop(grace_s=30)
        # uvicorn re-raises SIGTERM after its graceful shutdown; SIGKILL (-9) would mean the grace ran out.
        assert proc.proc.returncode == -signal.SIGTERM
        store = JobStore(tmp_path / "orchestrator" / "jobs.sqlite")
        assert store.get_job(job_id).status == "interrupted"
        store.close()
    finally:
        proc.stop()
        scripted.config.latency_ms = 0


def test_request_bodies_over_max_request_bytes_get_413(client):
    limit = 1024 * 1024  # the default MAX_REQUEST_BYTES
    declared = client.http.post(
        "/train", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413 and f"{limit} bytes (MAX_REQUEST_BYTES)" in declared.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it streams in
        for _ in range(3 * 16):
            yield b" " * (64 * 1024)

    streamed = client.http.post("/eval", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413 and "MAX_REQUEST_BYTES" in streamed.json()["detail"]


def test_jobs_beyond_running_plus_queued_limit_get_429_with_retry_after(scripted, tmp_path):
    env = {"MAX_CONCURRENT_JOBS": "1", "MAX_QUEUED_JOBS": "1"}
    scripted.config.latency_ms = 500
    try:
        with orchestrator_process(free_port(), scripted.url, tmp_path, env=env) as proc:
            proc.wait_ready(timeout_s=60)
            with OrchestratorClient(proc.url) as client:
                body = {"num_examples": 30, "max_tokens": 32}
                running, queued = (client.http.post("/eval", json=body) for _ in range(2))
                assert running.status_code == 202 and queued.status_code == 202
                refused = client.http.post("/train", json={"num_examples": 1})
                assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()
                assert "MAX_QUEUED_JOBS" in refused.json()["detail"]
                assert client.http.post("/eval", json=body).status_code == 429
                assert len(client.http.get("/jobs").json()["jobs"]) == 2  # nothing was stored for the refused
                for accepted in (queued, running):
                    assert client.http.post(f"/jobs/{accepted.json()['job_id']}/cancel").status_code == 200
                again = client.http.post("/eval", json=body)
                assert again.status_code == 202
                assert client.http.post(f"/jobs/{again.json()['job_id']}/cancel").status_code == 200
    finally:
        scripted.config.latency_ms = 0


def test_path_parameters_cannot_escape_the_job_folder(client):
    job_id = client.eval(num_examples=1, max_tokens=32)
    assert client.wait(job_id, timeout_s=60)["status"] == "completed"
    assert client.http.get(f"/jobs/{job_id}/trees/0").status_code == 404  # an eval job keeps no trees
    for path in (
        f"/jobs/{job_id}/files/..%2F..%2Fetc%2Fpasswd",
        f"/jobs/{job_id}/files/..%2F..%2Fjobs.sqlite",
        f"/jobs/{job_id}/files/%2Fetc%2Fpasswd",
        f"/jobs/{job_id}/trees/-1",
        f"/jobs/{job_id}/files/.env",
        f"/jobs/..%2F..%2F{job_id}/files/report.html",
        f"/jobs/..%2F{job_id}/results.jsonl",
    ):
        response = client.http.get(path)
        assert response.status_code == 404, path
        assert b"SQLite format" not in response.content and b"root:" not in response.content
    # Decoded, %2F is a slash, so those never match a route; a name without one reaches the checks.
    assert client.http.get(f"/jobs/{job_id}/files/%2E%2E").status_code == 404
    assert client.http.get(f"/jobs/{job_id}/trees/%2E%2E").status_code == 422  # n must be an integer
    assert client.http.get(f"/jobs/{job_id}/trees/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
