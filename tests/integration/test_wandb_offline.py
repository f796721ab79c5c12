"""Weights & Biases for real, offline: a train job run by the orchestrator process with WANDB_PROJECT set and
WANDB_MODE=offline writes a run under WANDB_DIR whose history holds every numeric step metric by name, step by
step, as the job's own step records have them. Real processes on 127.0.0.1: the trainer service (tiny student),
the orchestrator, and the scripted OpenAI-compatible server as the teacher. The run's `.wandb` file is read with
wandb's own protobuf messages (tests/support/wandb_records.py)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")

from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.local.processes import free_port, orchestrator_process
from support.tiny_search import TINY_SEARCH
from support.wandb_records import history, run_info

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_train_job_writes_its_step_metrics_to_an_offline_wandb_run(
    trainer_service, scripted_server, tmp_path
):
    teachers = [{"name": "good", "base_url": scripted_server.v1, "model": "good"}]
    env = {
        "TEACHER_TIER": "custom",
        "TEACHERS": json.dumps(teachers),
        "REQUEST_TIMEOUT_S": "300",
        "WANDB_PROJECT": "azt-offline-test",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_SILENT": "true",
    }
    (tmp_path / "wandb-dir").mkdir()
    process = orchestrator_process(free_port(), trainer_service.url, tmp_path, env=env)
    with process, OrchestratorClient(process.url, timeout_s=120) as client:
        process.wait_ready(timeout_s=60)
        job_id = client.train(num_examples=2, batch_size=1, search=TINY_SEARCH)
        job = client.wait(job_id, timeout_s=600)
        steps = client.steps(job_id)
    assert job["status"] == "completed", job["error"]
    assert [s["step"] for s in steps] == [1, 2]

    (run_file,) = (tmp_path / "wandb-dir" / "wandb").glob(f"offline-run-*-{job_id}/run-{job_id}.wandb")
    run = run_info(run_file)
    assert (run.project, run.run_id, run.display_name) == ("azt-offline-test", job_id, job_id)
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["request"]["num_examples"] == 2 and config["search"]["iterations"] == 2

    logged = history(run_file)
    assert sorted(logged) == [1, 2]
    for record in steps:
        expected = {
            name: value for name, value in record.items() if isinstance(value, int | float) and name != "step"
        }
        row = logged[record["step"]]
        assert {"mean_reward", "trajectories", "search_seconds", "tokens", "step_seconds"} <= set(expected)
        assert {name: row[name] for name in expected} == pytest.approx(expected), record["step"]
        assert all(math.isfinite(row[name]) for name in expected)
