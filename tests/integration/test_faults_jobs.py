"""Faults injected into whole train jobs (issue #7): teachers that fail, a checker that is down, a trainer killed
with -9 mid-job, a full disk under the job's files. Real processes on 127.0.0.1: the trainer service (tiny SmolLM2
student), the orchestrator (`python -m orchestrator serve`) and a scripted OpenAI-compatible server whose models
are the teachers (tests/support/scripted_server.py, faults chosen per model by rules). Driven only through the
REST API and SSE; budgets are tiny (one or two problems per job, two simulations, 8-token steps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.local.processes import free_port, orchestrator_process
from support.scripted_server import Rule
from support.tiny_search import TINY_SEARCH

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "sk-fault-test-0123456789abcdef"  # the API key of one failing teacher: it must never reach an event


def teacher(name: str, url: str, tier: str, **extra) -> dict:
    return {"name": name, "base_url": url, "model": name, "tier": tier, **extra}


class Orchestrator:
    """One orchestrator process for a test, with its own data folder."""

    def __init__(self, trainer, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        self.process = orchestrator_process(
            free_port(),
            trainer.url,
            workdir,
            env={"REQUEST_TIMEOUT_S": "900", "TRAINER_WAIT_S": "300", **env},
        )

    def __enter__(self) -> OrchestratorClient:
        self.process.start()
        self.process.wait_ready(timeout_s=60)
        self.client = OrchestratorClient(self.process.url, timeout_s=120)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.process.stop()

    def job_dir(self, job_id: str) -> Path:
        return self.workdir / "orchestrator" / "jobs" / job_id


def custom_teachers(teachers: list[dict], checker_url: str | None = None) -> dict[str, str]:
    env = {"TEACHER_TIER": "custom", "TEACHERS": json.dumps(teachers), "FAULT_TEACHER_KEY": SECRET}
    if checker_url:
        env["CHECKER_URL"] = checker_url
    return env


def trainer_health(trainer) -> dict:
    return httpx.get(trainer.url + "/health", timeout=10).json()


def assert_each_step_applied_once(steps: list[dict], trainer_step_start: int, trainer) -> list[dict]:
    """Steps 1..n recorded once each; the trainer counted exactly one update per applied step, in order."""
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    applied = [s for s in steps if not s.get("skipped")]
    assert [s["trainer_step"] for s in applied] == list(
        range(trainer_step_start + 1, trainer_step_start + len(applied) + 1)
    )
    assert not any(s.get("duplicate") for s in applied)
    assert trainer_health(trainer)["step"] == trainer_step_start + len(applied)
    return applied


# --- 1. teachers ----------------------------------------------------------------------------------------------
def test_teachers_failing_mid_job_are_reported_and_the_job_goes_on_with_the_good_one(
    trainer_service, scripted_server, tmp_path
):
    url = scripted_server.v1
    # Each teacher that will fail in a tier of its own, ahead of the good one: every expansion tries them first
    # (until they rest after two failures in a row), so each fault is met, deterministically.
    teachers = [
        teacher("t-500", url, "a", api_key_env="FAULT_TEACHER_KEY"),
        teacher("t-hang", url, "b", timeout_s=2.0),
        teacher("t-drop", url, "c"),
        teacher("t-malformed", url, "d"),
        teacher("good", url, "z"),
    ]
    faults = [
        Rule(mode="error", status=500, model="t-500"),
        Rule(mode="hang", model="t-hang"),
        Rule(mode="drop", model="t-drop"),
        Rule(mode="malformed", model="t-malformed"),
    ]
    # Three steps on train-0 (gold 72), whose teacher answers are right: every group has a signal to learn from.
    scripted_server.config.answer = "72"
    with Orchestrator(trainer_service, tmp_path, custom_teachers(teachers)) as client:
        job_id = client.train(num_examples=1, epochs=3, batch_size=1, checkpoint_every=3, search=TINY_SEARCH)
        events = []
        for event in client.follow(job_id):
            events.append(event)
            if event.type == "step":  # step 1 went well; the faults begin (step 2 searches for seconds yet)
                served_before = {r["model"] for r in scripted_server.log}
                scripted_server.set_rules(faults)
                break
        events += list(client.follow(job_id, after=events[-1].id))
        job = client.job(job_id)
    assert served_before == {"t-500"}  # first in line, it served all of step 1
    assert job["status"] == "completed", job["error"]
    errors = [e.data for e in events if e.type == "teacher_error"]
    kinds = {e["teacher"]: e["kind"] for e in errors}
    assert kinds == {
        "t-500": "http_500",
        "t-hang": "timeout",
        "t-drop": "connection",
        "t-malformed": "malformed",
    }
    assert min(e["step"] for e in errors) >= 2
    assert [e.data["step"] for e in events if e.type == "step"] == [1, 2, 3]
    assert job["result"]["applied_steps"] >= 1
    assert {r["model"] for r in scripted_server.log if r["mode"] == "ok"} >= {"t-500", "good"}
    # The key was sent to its teacher, and appears nowhere in what the job shows.
    assert any(r["authorization"] == f"Bearer {SECRET}" for r in scripted_server.log if r["model"] == "t-500")
    shown = json.dumps([e.data for e in events]) + json.dumps(job)
    assert SECRET not in shown


def test_a_job_with_every_teacher_failing_fails_with_the_reason(trainer_service, scripted_server, tmp_path):
    url = scripted_server.v1
    teachers = [teacher("t-500", url, "a"), teacher("t-malformed", url, "b")]
    scripted_server.set_rules(
        [Rule(mode="error", status=503, model="t-500"), Rule(mode="malformed", model="t-malformed")]
    )
    step_before = trainer_health(trainer_service)["step"]
    with Orchestrator(trainer_service, tmp_path, custom_teachers(teachers)) as client:
        job_id = client.train(num_examples=2, batch_size=1, search=TINY_SEARCH)
        events = list(client.follow(job_id))
        job = client.job(job_id)
        steps = client.steps(job_id)
    assert job["status"] == "failed"
    assert job["error"].startswith("NoTeacherLeft: every teacher failed in step 1"), job["error"]
    assert "t-500: http_503" in job["error"] and "t-malformed: malformed" in job["error"]
    assert {e.data["teacher"] for e in events if e.type == "teacher_error"} == {"t-500", "t-malformed"}
    assert steps == [] and not [e for e in events if e.type == "step"]
    assert trainer_health(trainer_service)["step"] == step_before  # nothing was learned from nothing


DEAD_TEACHER_SEARCH = {**TINY_SEARCH, "iterations": 8}  # 2 trees x 8 forks x 2 teacher requests per step


def test_a_dead_teacher_loses_its_share_of_picks_over_the_job(trainer_service, scripted_server, tmp_path):
    """Issue #18: a teacher that accepts connections and never answers, beside a live one in the same tier. No
    rest (TEACHER_COOLDOWN_S=0), so only the failure rate in the pick weight keeps it from being asked: its share of
    each step's picks falls, its weight falls with every step, and /health shows it while the job runs. Before,
    its weight rose (a failure never moved its score, and the live teacher's went negative)."""
    url = scripted_server.v1
    teachers = [teacher("dead", url, "one", timeout_s=1.0), teacher("live", url, "one")]
    scripted_server.set_rules([Rule(mode="hang", model="dead")])
    env = {**custom_teachers(teachers), "TEACHER_COOLDOWN_S": "0"}
    with Orchestrator(trainer_service, tmp_path, env) as client:
        job_id = client.train(num_examples=6, batch_size=2, checkpoint_every=3, search=DEAD_TEACHER_SEARCH)
        shares, weights, health = [], [], []
        for event in client.follow(job_id):
            if event.type == "teachers":
                shares.append(event.data["teachers"]["dead"]["pick_share"])
                weights.append(event.data["teachers"]["dead"]["weight"])
                if len(shares) == 1:  # the job goes on: /health shows the teachers of the running job
                    health = client.health()["teachers"]
        job = client.job(job_id)
    assert job["status"] == "completed", job["error"]
    print("dead teacher: pick share", shares, "weight", weights)
    assert len(shares) == 3, shares
    assert shares[0] > shares[-1] and shares[-1] <= 0.2, shares
    assert weights == sorted(weights, reverse=True) and weights[-1] < 0.1, weights
    dead = {t["name"]: t for t in health}["dead"]
    assert dead["job_id"] == job_id and dead["failure_rate"] > 0.5 and dead["last_error"] == "timeout", health
    assert dead["weight"] < {t["name"]: t for t in health}["live"]["weight"]


# --- 2. the checker -------------------------------------------------------------------------------------------
def test_a_dead_checker_leaves_the_rules_and_the_job_records_the_degraded_mode(
    trainer_service, scripted_server, tmp_path
):
    # Teacher steps are final sentences the rules are unsure of ("So in total she has 42 apples."), so the
    # checker is asked; nothing listens on its port.
    scripted_server.config.answer_depth = 1
    scripted_server.config.final_style = "sentence"
    dead_checker = f"http://127.0.0.1:{free_port()}/v1"
    env = custom_teachers([teacher("good", scripted_server.v1, "z")], checker_url=dead_checker)
    search = {**TINY_SEARCH, "use_checker": True}
    with Orchestrator(trainer_service, tmp_path, env) as client:
        job_id = client.train(num_examples=1, batch_size=1, search=search)
        events = list(client.follow(job_id))
        job = client.job(job_id)
        tree = client.tree(job_id, 0)["tree"]
    assert job["status"] == "completed", job["error"]
    assert "checker_failed" in [e.data["mode"] for e in events if e.type == "degraded"]
    assert "checker_failed" in job["progress"]["degraded"]
    assert "checker_failed" in job["result"]["degraded"]
    assert "checker_failed" in client_steps_degraded(events)
    # The search went on with the rules alone: its leaves were closed by them (an answer line, the end of the
    # answer or its budget; "answer_end": it ended on the unsure sentence, scored by its last number).
    reasons = {n.get("terminal_reason") for n in tree["nodes"] if n.get("terminal")}
    rules = {"token_limit", "answer_line", "answer_phrase", "eos", "answer_end"}
    assert reasons and reasons <= rules, reasons
    assert "answer_end" in reasons  # the teacher's "So in total she has 42 apples."


def client_steps_degraded(events) -> set[str]:
    return {mode for e in events if e.type == "step" for mode in e.data.get("degraded", [])}


# --- 3. the trainer killed mid-job ----------------------------------------------------------------------------
def test_trainer_killed_mid_job_is_waited_for_and_the_job_rewinds_to_its_checkpoint(
    trainer_service, scripted_server, tmp_path
):
    env = custom_teachers([teacher("good", scripted_server.v1, "z")])
    with Orchestrator(trainer_service, tmp_path, env) as client:
        # Checkpoints at steps 0, 2 and 3; the kill comes once step 1 is done, before its checkpoint.
        job_id = client.train(num_examples=3, offset=20, batch_size=1, checkpoint_every=2, search=TINY_SEARCH)
        events = []
        for event in client.follow(job_id):
            events.append(event)
            if event.type == "step":
                break
        started_at = trainer_health(trainer_service)["started_at"]
        trainer_service.service.kill()  # SIGKILL, mid-job
        trainer_service.start()  # the same port and checkpoint folder, a new process (it loads for a while)
        assert trainer_health(trainer_service)["started_at"] != started_at
        events += list(client.follow(job_id, after=events[-1].id))
        job = client.job(job_id)
        steps = client.steps(job_id)
    print(
        "trainer kill -9, events:",
        [
            (e.type, e.data.get("step", e.data.get("from_step")))
            for e in events
            if e.type not in ("progress", "tree")
        ],
    )
    assert job["status"] == "completed", job["error"]
    types = [e.type for e in events]
    restarted = [e.data for e in events if e.type == "trainer_restarted"]
    assert len(restarted) == 1 and restarted[0]["from_step"] == 0, restarted
    assert restarted[0]["trainer_step"] == job["progress"]["trainer_step_start"]
    assert types.index("trainer_restarted") > types.index("step")
    assert job["result"]["trainer_restarts"] == 1
    assert_each_step_applied_once(steps, job["progress"]["trainer_step_start"], trainer_service)
    assert job["result"]["checkpoint"]["step"] == 3


# --- 6. the disk fills under a job's files ------------------------------------------------------------------------
def test_a_full_disk_under_the_job_fails_it_clearly_and_it_resumes_once_there_is_room(
    trainer_service, scripted_server, tmp_path
):
    env = custom_teachers([teacher("good", scripted_server.v1, "z")])
    orchestrator = Orchestrator(trainer_service, tmp_path, env)
    with orchestrator as client:
        job_id = client.train(num_examples=2, offset=30, batch_size=1, checkpoint_every=1, search=TINY_SEARCH)
        # The second tree file is /dev/full: writing it fails with ENOSPC, as on a full disk. Set up long before
        # the job gets there (it first searches and trains step 1).
        full = orchestrator.job_dir(job_id) / "trees" / "000001.json"
        full.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/dev/full", full)
        list(client.follow(job_id))
        job = client.job(job_id)
        assert job["status"] == "failed"
        assert "No space left on device" in job["error"] and "000001.json" in job["error"], job["error"]
        assert [s["step"] for s in client.steps(job_id)] == [1]  # the store holds what was done, no more
        assert job["progress"]["checkpoint"]["step"] == 1

        full.unlink()  # room again
        client.resume(job_id)
        events = list(client.follow(job_id))
        job = client.job(job_id)
        steps = client.steps(job_id)
    assert job["status"] == "completed", job["error"]
    assert [e.data["from_step"] for e in events if e.type == "resumed"] == [1]
    assert_each_step_applied_once(steps, job["progress"]["trainer_step_start"], trainer_service)
    assert json.loads(full.read_text())["step"] == 2


def test_a_full_disk_under_the_job_store_is_retried_then_the_job_fails_clearly_and_resumes(
    trainer_service, scripted_server, tmp_path
):
    """The orchestrator runs with SIGXFSZ ignored; at the job's first `step` event its RLIMIT_FSIZE drops to 0
    (prlimit(2)), so every write (SQLite's WAL, job files) fails as on a full disk. The job's next store write
    fails, and so does storing its "failed" status: the manager logs that and tries again. Its stderr is a pipe
    (no file size limit there), which is how the test sees it; then the limit is lifted."""
    import resource
    import subprocess
    import sys
    import threading

    spec = orchestrator_process(
        free_port(),
        trainer_service.url,
        tmp_path,
        env={
            "TRAINER_WAIT_S": "300",
            **custom_teachers([teacher("good", scripted_server.v1, "z")]),
        },
    )
    code = (
        "import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"sys.argv = {['orchestrator', *spec.args[2:]]!r}; "
        "runpy.run_module('orchestrator', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **spec.env},
        cwd=spec.cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    retrying = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            if "cannot store status failed" in line:
                retrying.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    hard = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)[1]
    try:
        spec.wait_ready(timeout_s=60)
        with OrchestratorClient(spec.url, timeout_s=120) as client:
            job_id = client.train(
                num_examples=2, offset=50, batch_size=1, checkpoint_every=1, search=TINY_SEARCH
            )
            for event in client.follow(job_id):
                if event.type == "step":
                    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, hard))  # the disk is full
                    break
            assert retrying.wait(300), "the orchestrator never reported the failed status write"
            assert client.job(job_id)["status"] == "running"  # reads work; the failure is not stored yet
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # room again
            job = client.wait(job_id, timeout_s=300, poll_s=0.5)
            assert job["status"] == "failed"
            assert job["error"].startswith("StoreError: the job store "), job["error"]
            assert "(is the disk full?)" in job["error"]
            assert [s["step"] for s in client.steps(job_id)] == [
                1
            ]  # the store is consistent: step 1 and no more
            checkpoint_step = job["progress"]["checkpoint"]["step"]  # 0, or 1 if its record beat the limit
            print(f"full job store: error {job['error']!r}, last stored checkpoint step {checkpoint_step}")
            assert checkpoint_step in (0, 1)

            client.resume(job_id)
            events = list(client.follow(job_id))
            job = client.job(job_id)
            steps = client.steps(job_id)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(30)
    assert job["status"] == "completed", job["error"]
    assert [e.data["from_step"] for e in events if e.type == "resumed"] == [checkpoint_step]
    assert_each_step_applied_once(steps, job["progress"]["trainer_step_start"], trainer_service)
