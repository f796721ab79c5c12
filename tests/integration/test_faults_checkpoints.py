"""Faults under the trainer's checkpoints (issue #7), against the real trainer service (tiny SmolLM2, LoRA r=32:
~40 MB of adapter and ~80 MB of optimizer state per checkpoint once a step was applied).

- kill -9 while POST /checkpoints writes, at several moments, then a restart on the same folder: the previous
  checkpoint loads with its recorded sha256 and step; a half-written one is never listed nor loaded.
- a full disk: the trainer runs with SIGXFSZ ignored and, at the moment of the test, RLIMIT_FSIZE lowered to 1 MiB
  with prlimit(2) for it and its engine process, so every checkpoint write fails with EFBIG exactly as writes fail on
  a full disk (no root, no mounts). The save answers 507 naming the cause; the previous checkpoint is untouched and loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import threading
from pathlib import Path

import httpx
import pytest

from support.trainer_process import TrainerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The trainer as usual, but a write past RLIMIT_FSIZE fails with EFBIG instead of killing the process.
IGNORE_SIGXFSZ = (
    "import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "sys.argv = ['azt-trainer', '--log-level', 'warning']; "
    "runpy.run_module('services.trainer', run_name='__main__', alter_sys=True)"
)
KILL_AFTER_WRITE_STARTS_S = [0.0, 0.05, 0.15]  # after the temporary directory appears


@pytest.fixture(scope="module")
def trainer(trainer_model_dir, tmp_path_factory):
    process = TrainerProcess(checkpoint_dir=tmp_path_factory.mktemp("faults-ckpt"))
    process.service.args = ["-c", IGNORE_SIGXFSZ]
    with process:
        yield process


def post(trainer, path: str, body: dict, timeout: float = 300.0) -> httpx.Response:
    return httpx.post(trainer.url + path, json=body, timeout=timeout)


def listed(trainer) -> list[str]:
    return [c["name"] for c in httpx.get(trainer.url + "/checkpoints", timeout=30).json()["checkpoints"]]


def files_match_meta(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    for file, record in meta["files"].items():
        assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == record["sha256"], file
    return meta


@pytest.fixture(scope="module")
def previous(trainer) -> dict:
    """One applied step (so the optimizer has state to write), then the checkpoint every fault must spare."""
    item = {"prompt": "2+2=", "completion": " 4", "advantage": 1.0}
    assert post(trainer, "/grpo/step", {"items": [item], "step_key": "faults:1"}).status_code == 200
    saved = post(trainer, "/checkpoints", {"name": "previous"}).json()
    meta = files_match_meta(trainer.checkpoint_dir / "previous")
    return {"step": saved["step"], "adapter_version": saved["adapter_version"], "files": meta["files"]}


def assert_previous_loads(trainer, previous: dict) -> None:
    response = post(trainer, "/checkpoints/load", {"name": "previous"})
    assert response.status_code == 200, response.text
    assert response.json()["step"] == previous["step"]
    assert response.json()["adapter_version"] == previous["adapter_version"]
    assert files_match_meta(trainer.checkpoint_dir / "previous")["files"] == previous["files"]


@pytest.mark.parametrize("delay_s", KILL_AFTER_WRITE_STARTS_S)
def test_kill_during_a_checkpoint_save_leaves_the_previous_one_loadable(trainer, previous, delay_s):
    root = trainer.checkpoint_dir
    outcome: dict = {}

    def save() -> None:
        try:
            outcome["response"] = post(trainer, "/checkpoints", {"name": "next"})
        except httpx.HTTPError as exc:  # the connection dies with the process
            outcome["error"] = exc

    saver = threading.Thread(target=save)
    saver.start()
    stopped = threading.Event()
    while not list(root.glob(".next.tmp-*")) and saver.is_alive():  # wait for the write to begin
        stopped.wait(0.005)
    stopped.wait(delay_s)
    trainer.service.kill()
    saver.join(60)
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    trainer.start()  # same port, same folder

    names = listed(trainer)
    assert "previous" in names and not [n for n in names if n.startswith(".")]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the dead save's leftovers are removed
    assert_previous_loads(trainer, previous)
    if "next" in names:  # the save got to its final rename before the kill: complete and loadable
        assert files_match_meta(root / "next")["step"] == previous["step"]
        assert post(trainer, "/checkpoints/load", {"name": "next"}).status_code == 200
    else:  # died while writing: only a hidden temporary directory is left, and it cannot be loaded
        assert left and all(".tmp-" in name for name in left), left
        assert post(trainer, "/checkpoints/load", {"name": "next"}).status_code in (404, 409)
    print(
        f"kill {delay_s}s after the write began: next {'complete' if 'next' in names else 'absent'}, "
        f"left {left}, response {outcome.get('response') or type(outcome.get('error')).__name__}"
    )
    if "next" in names:  # start the next repetition without it
        import shutil

        shutil.rmtree(root / "next")


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants: with TRAINER_ENGINE_PROCESS the engine process (the trainer's child)
    writes the checkpoints."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():  # a child belongs to the thread that started it
        with contextlib.suppress(FileNotFoundError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *(p for child in children for p in process_tree(child))]


def limit_file_size(pid: int, limits: tuple[int, int]) -> None:
    """RLIMIT_FSIZE of the trainer and every process under it."""
    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(member, resource.RLIMIT_FSIZE, limits)


def test_a_full_disk_during_a_checkpoint_save_is_507_and_the_previous_one_stays(trainer, previous):
    pid = trainer.service.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    limit_file_size(pid, (1 << 20, hard))  # files may not grow past 1 MiB
    try:
        for name in ("full", "previous"):  # a new checkpoint, and one replacing the previous checkpoint
            response = post(trainer, "/checkpoints", {"name": name})
            assert response.status_code == 507, response.text
            message = response.json()["error"]["message"]
            assert message.startswith(f"checkpoint {name}: no space left"), message
            assert "File too large" in message  # EFBIG, the errno the size limit gives
        assert "full" not in listed(trainer)
        assert not [p for p in trainer.checkpoint_dir.iterdir() if ".tmp-" in p.name]  # cleaned up
        assert_previous_loads(trainer, previous)  # reading needs no room
    finally:
        limit_file_size(pid, (soft, hard))
    assert post(trainer, "/checkpoints", {"name": "full"}).status_code == 200  # room again: saving works
    assert_previous_loads(trainer, previous)


def test_a_train_job_whose_checkpoint_meets_a_full_disk_fails_clearly_and_resumes(
    trainer, scripted_server, tmp_path
):
    """The same full disk under a train job: the job fails naming it, and resumes from its last checkpoint."""
    from orchestrator.clients.orchestrator import OrchestratorClient
    from orchestrator.local.processes import free_port, orchestrator_process

    teachers = [{"name": "good", "base_url": scripted_server.v1, "model": "good"}]
    env = {"TEACHER_TIER": "custom", "TEACHERS": json.dumps(teachers)}
    search = {
        "iterations": 2,
        "max_depth": 2,
        "chunk_tokens": 8,
        "max_tokens": 32,
        "n_student": 1,
        "rollout": False,
        "use_checker": False,
    }
    orch = orchestrator_process(free_port(), trainer.url, tmp_path, env=env).start()
    pid = trainer.service.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    try:
        orch.wait_ready(timeout_s=60)
        with OrchestratorClient(orch.url, timeout_s=120) as client:
            job_id = client.train(num_examples=2, offset=40, batch_size=1, checkpoint_every=1, search=search)
            for event in client.follow(job_id):
                if event.type == "checkpoint":  # step 0 saved: the disk fills before step 1's checkpoint
                    limit_file_size(pid, (1 << 20, hard))
                    break
            list(client.follow(job_id, after=event.id))
            job = client.job(job_id)
            assert job["status"] == "failed"
            assert job["error"].startswith("TrainerError: trainer HTTP 507"), job["error"]
            assert f"checkpoint {job_id}-step000001: no space left" in job["error"]
            assert (
                job["progress"]["checkpoint"]["step"] == 0
            )  # the job still points at a checkpoint that exists

            limit_file_size(pid, (soft, hard))  # room again
            client.resume(job_id)
            events = list(client.follow(job_id))
            job = client.job(job_id)
            steps = client.steps(job_id)
    finally:
        limit_file_size(pid, (soft, hard))
        orch.stop()
    assert job["status"] == "completed", job["error"]
    assert [e.data["from_step"] for e in events if e.type == "resumed"] == [0]
    assert [s["step"] for s in steps] == [1, 2]
    start = job["progress"]["trainer_step_start"]
    applied = [s for s in steps if not s.get("skipped")]
    assert [s["trainer_step"] for s in applied] == list(range(start + 1, start + len(applied) + 1))
    health = httpx.get(trainer.url + "/health", timeout=10).json()
    assert health["step"] == start + len(applied)
