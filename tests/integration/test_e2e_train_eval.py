"""End to end on the embedded default: the real trainer service (tiny SmolLM2 student; its "base" model is
teacher and checker) and the orchestrator, both as processes on 127.0.0.1, driven only through the REST API.

Budgets are tiny (two problems, two simulations, short steps) so this stays a few minutes on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.local.processes import free_port, orchestrator_process
from support.trainer_process import TrainerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_SEARCH = {
    "iterations": 2,
    "max_depth": 2,
    "chunk_tokens": 16,
    "max_tokens": 64,
    "parallel_simulations": 2,
    "n_student": 2,
    "n_teacher_right": 1,
    "n_teacher_wrong": 1,
    "rollout": False,
    "use_checker": False,
}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    with TrainerProcess(checkpoint_dir=tmp_path_factory.mktemp("trainer") / "checkpoints") as process:
        yield process


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def start_orchestrator(port: int, trainer: TrainerProcess, workdir: Path):
    proc = orchestrator_process(
        port,
        trainer.url,
        workdir,
        env={"TEACHER_TIER": "embedded", "REQUEST_TIMEOUT_S": "900"},
    ).start()
    proc.wait_ready(timeout_s=60)
    return proc


def test_train_then_eval_through_the_api(trainer, workdir):
    orch = start_orchestrator(free_port(), trainer, workdir)
    try:
        with OrchestratorClient(orch.url, timeout_s=120) as client:
            health = client.health()
            assert health["status"] == "ok", health
            version_before = httpx.get(trainer.url + "/health").json()["adapter_version"]

            job_id = client.train(num_examples=2, batch_size=1, checkpoint_every=1, search=TINY_SEARCH)
            events = list(client.follow(job_id))
            statuses = [e.data["status"] for e in events if e.type == "status"]
            assert statuses == ["queued", "running", "completed"], [
                e.data for e in events if e.type == "status"
            ]
            steps = [e.data for e in events if e.type == "step"]
            assert [s["step"] for s in steps] == [1, 2]
            assert {
                "mean_reward",
                "correct_leaf_share",
                "kl",
                "tokens",
                "teacher_weights",
                "search_seconds",
            } <= set(steps[0])
            assert [e.data["n"] for e in events if e.type == "tree"] == [0, 1]

            job = client.job(job_id)
            result = job["result"]
            applied = result["applied_steps"]
            # A group whose answers are all wrong is dropped (the recipe): the embedded 135M teacher and student
            # rarely write a correct 64-token answer, so a step here is often skipped. Each step says which; the
            # applied step of the recipe is test_reference_teacher.py's train job (the reference teacher).
            for record in client.steps(job_id):
                assert record["dropped_groups"] + (record["items"] > 0) == record["trees"] == 1, record
                assert bool(record.get("skipped")) == (record["items"] == 0), record
            trainer_health = httpx.get(trainer.url + "/health").json()
            assert result["adapter_version"] == trainer_health["adapter_version"] == version_before + applied
            checkpoints = httpx.get(trainer.url + "/checkpoints").json()["checkpoints"]
            assert result["checkpoint"]["name"] in {c["name"] for c in checkpoints}
            assert result["checkpoint"]["step"] == 2
            assert Path(result["checkpoint"]["path"]).exists()
            assert len(client.steps(job_id)) == 2

            tree = client.tree(job_id, 0)
            assert tree["problem"]["id"] == "train-0" and len(tree["tree"]["nodes"]) > 1
            assert client.tree(job_id, 1, format="svg").startswith("<svg")
            assert client.http.get(f"/jobs/{job_id}/files/curves.png").content.startswith(b"\x89PNG")

            eval_id = client.eval(num_examples=2, max_tokens=32, concurrency=4)
            eval_job = client.wait(eval_id, timeout_s=900)
            assert eval_job["status"] == "completed", eval_job["error"]
            report = eval_job["result"]
            rows = client.results(eval_id)
            assert len(rows) == 4
            for model in ("base", "student"):
                mrows = [r for r in rows if r["model"] == model]
                assert report["models"][model]["strict_correct"] == sum(r["strict_correct"] for r in mrows)
                assert report["models"][model]["flexible_correct"] == sum(
                    r["flexible_correct"] for r in mrows
                )
                assert report["models"][model]["n"] == 2
            assert {r["adapter_version"] for r in rows if r["model"] == "student"} == {
                result["adapter_version"]
            }
            only_base = sum(
                1
                for pid in {r["problem_id"] for r in rows}
                if [r["strict_correct"] for r in rows if r["problem_id"] == pid and r["model"] == "base"]
                == [True]
                and [r["strict_correct"] for r in rows if r["problem_id"] == pid and r["model"] == "student"]
                == [False]
            )
            assert report["comparison"]["strict"]["only_base"] == only_base
    finally:
        orch.stop()


def test_kill_and_restart_mid_job_then_resume_applies_no_step_twice(trainer, workdir):
    port = free_port()
    orch = start_orchestrator(port, trainer, workdir)
    with OrchestratorClient(orch.url, timeout_s=120) as client:
        # Checkpoints at steps 0, 2 and 3; the kill comes after step 1 was applied, before its checkpoint.
        job_id = client.train(num_examples=3, offset=10, batch_size=1, checkpoint_every=2, search=TINY_SEARCH)
        for event in client.follow(job_id):
            if event.type == "step":
                break
        orch.kill()
    start = client_job_progress = None
    orch = start_orchestrator(port, trainer, workdir)
    try:
        with OrchestratorClient(orch.url, timeout_s=120) as client:
            job = client.job(job_id)
            assert job["status"] == "interrupted"
            client_job_progress = job["progress"]
            start = client_job_progress["trainer_step_start"]
            assert client.http.post(f"/jobs/{job_id}/resume").status_code == 202
            events = list(client.follow(job_id))
            job = client.job(job_id)
            assert job["status"] == "completed", job["error"]
            resumed = [e.data for e in events if e.type == "resumed"]
            assert resumed and resumed[-1]["from_step"] == 0
            steps = client.steps(job_id)
            assert [s["step"] for s in steps] == [1, 2, 3]  # a continuous count, each step recorded once
            applied = [s for s in steps if not s.get("skipped")]
            # Steps after the checkpoint were undone by loading it and applied once more: the trainer counted
            # exactly one update per applied step since the job began.
            final = httpx.get(trainer.url + "/health").json()
            assert final["step"] == start + len(applied)
            assert [s["trainer_step"] for s in applied] == list(range(start + 1, start + len(applied) + 1))
            assert not any(s.get("duplicate") for s in applied)
    finally:
        orch.stop()
