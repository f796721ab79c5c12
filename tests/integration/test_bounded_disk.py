"""Bounded disk on the real trainer service (issue #18): each series of checkpoints keeps its last K, a byte
budget refuses a save with 507 before anything is written, and DELETE /checkpoints/{name} makes room again.
The tiny SmolLM2 with no step applied writes ~40 MB per checkpoint (the LoRA adapter; no optimizer state yet)."""

from __future__ import annotations

import httpx
import pytest

from support.trainer_process import TrainerProcess

pytestmark = pytest.mark.integration

MB = 10**6
BUDGET = 150 * MB  # three checkpoints fit, a fourth does not


@pytest.fixture(scope="module")
def trainer(trainer_model_dir, tmp_path_factory):
    env = {"TRAINER_CHECKPOINT_KEEP_LAST": "2", "TRAINER_CHECKPOINT_MAX_BYTES": str(BUDGET)}
    with TrainerProcess(checkpoint_dir=tmp_path_factory.mktemp("bounded-ckpt"), env=env) as process:
        yield process


def save(trainer, name: str) -> httpx.Response:
    return httpx.post(trainer.url + "/checkpoints", json={"name": name}, timeout=300)


def folder_bytes(trainer) -> int:
    return sum(p.stat().st_size for p in trainer.checkpoint_dir.rglob("*") if p.is_file())


def test_checkpoints_keep_the_last_k_per_job_and_stay_within_the_budget(trainer):
    saved = [save(trainer, f"train-abc-step{step:06d}") for step in range(4)]
    assert [r.status_code for r in saved] == [200] * 4
    assert [r.json()["pruned"] for r in saved] == [[], [], ["train-abc-step000000"], ["train-abc-step000001"]]
    size = saved[-1].json()["bytes"]
    assert 30 * MB < size < 50 * MB
    assert save(trainer, "best").status_code == 200  # named: kept beside the job's last two
    refused = save(trainer, "second")
    assert refused.status_code == 507, refused.text
    error = refused.json()["error"]
    assert error["param"] == "name" and "TRAINER_CHECKPOINT_MAX_BYTES" in error["message"]
    assert "nothing was written" in error["message"]
    listing = httpx.get(trainer.url + "/checkpoints", timeout=30).json()
    assert [c["name"] for c in listing["checkpoints"]] == [
        "train-abc-step000002",
        "train-abc-step000003",
        "best",
    ]
    assert listing["max_bytes"] == BUDGET and listing["keep_last"] == 2
    assert listing["total_bytes"] == folder_bytes(trainer) <= BUDGET
    # The job's series goes on within the budget (each save sheds its oldest).
    assert save(trainer, "train-abc-step000004").json()["pruned"] == ["train-abc-step000002"]
    deleted = httpx.delete(trainer.url + "/checkpoints/best", timeout=30)
    assert deleted.status_code == 200 and deleted.json()["bytes"] > 30 * MB
    assert save(trainer, "second").status_code == 200
    assert httpx.delete(trainer.url + "/checkpoints/best", timeout=30).status_code == 404
    assert httpx.delete(trainer.url + "/checkpoints/..", timeout=30).status_code in (404, 422)
    assert folder_bytes(trainer) <= BUDGET
    loaded = httpx.post(trainer.url + "/checkpoints/load", json={"name": "train-abc-step000004"}, timeout=300)
    assert loaded.status_code == 200
