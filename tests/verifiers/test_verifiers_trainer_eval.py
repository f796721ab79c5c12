"""`vf-eval alphazero-llm-trainer` (verifiers' own CLI, a separate process) against the real trainer service
on 127.0.0.1: the tiny student answers two GSM8K problems, the rewards come from the project's scoring and PRE
from the trainer's /logprobs. Needs the `verifiers` extra (skipped without it)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("verifiers.v1", reason="needs the verifiers extra: pip install -e '.[verifiers]'")

from orchestrator.clients.trainer import TrainerClient
from orchestrator.gsm8k.data import load_gsm8k, question_messages
from orchestrator.search.rewards import hre, step_pre
from orchestrator.settings import RewardWeights

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # the student generates on CPU


async def test_vf_eval_of_two_problems_against_the_trainer_service(trainer_service, tmp_path, vf_eval):
    out = tmp_path / "outputs"
    run = vf_eval(
        "alphazero-llm-trainer",
        "-m",
        "student",
        "-n",
        "2",
        "--no-push",
        "--no-rich",
        "-o",
        str(out),
        "--client.base-url",
        trainer_service.base_url,
        "--client.api-key-var",
        "AZT_TEST_NO_KEY",
        "--sampling.max-tokens",
        "24",
        "--sampling.temperature",
        "0",
        "--env.taskset.task.use-student-model",
        "true",
        "--env.taskset.task.trainer-url",
        trainer_service.url,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    traces = [json.loads(line) for line in next(out.rglob("traces.jsonl")).open()]
    traces = [t for record in traces for t in record.get("traces", [record])]  # one episode = one trace here
    assert len(traces) == 2
    weights = RewardWeights()
    async with TrainerClient(trainer_service.url) as trainer:
        for trace in traces:
            assert trace["ok"] and not trace["errors"], trace["errors"]
            data = trace["task"]["data"]
            reply = next(
                n["message"]["content"]
                for n in reversed(trace["nodes"])
                if n["message"]["role"] == "assistant"
            ).strip()
            assert reply and trace["calls"][0]["model"] == "student"
            rewards = trace["rewards"]
            assert set(rewards) == {"correct", "format", "perplexity"}
            assert rewards["correct"] == {"score": hre(reply, data["answer"]), "weight": weights.hre}
            # PRE as the trainer scores it now (same adapter, deterministic forward pass)
            problem = load_gsm8k("test", limit=1, offset=data["info"]["index"])[0]
            items = [
                {"messages": question_messages(problem), "completion": c}
                for c in (reply, data["info"]["solution"])
            ]
            reply_mean, gold_mean = (r.mean for r in (await trainer.logprobs(items)).results)
            assert rewards["perplexity"]["weight"] == weights.pre
            assert math.isfinite(rewards["perplexity"]["score"])
            assert rewards["perplexity"]["score"] == pytest.approx(step_pre(reply_mean, gold_mean), abs=1e-3)
