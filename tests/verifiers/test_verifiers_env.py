"""The verifiers environment `alphazero-llm-trainer`: discovery through verifiers' own loader, the dataset,
the rewards on known-right and known-wrong replies, and one in-process `vf-eval` run against the scripted
OpenAI-compatible server. Needs the `verifiers` extra (skipped without it)."""

from __future__ import annotations

import json

import pytest

vf = pytest.importorskip("verifiers.v1", reason="needs the verifiers extra: pip install -e '.[verifiers]'")

from orchestrator.clients.trainer import TrainerClient
from orchestrator.gsm8k.data import load_gsm8k, question_messages
from orchestrator.settings import RewardWeights
from support.scripted_server import ScriptedServer, ServerConfig

ENV_ID = "alphazero-llm-trainer"


def env_config(**taskset):
    return vf.resolve_env_config({"taskset": {"id": ENV_ID, "limit": 3, **taskset}})


def scored_trace(task, reply: str):
    """A finished single-turn trace whose reply is `reply`, as the harness would leave it."""
    return vf.Trace(
        task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key),
        agent=vf.AgentInfo(config=vf.AgentConfig()),
        root_reply=reply,
    )


def test_verifiers_loader_finds_the_environment_by_its_id():
    env = vf.load_environment(env_config())
    assert type(env).__name__ == "ProblemEnv"
    assert type(env.taskset).__name__ == "ProblemTaskset"
    assert vf.default_harness_id(ENV_ID) == ENV_ID  # our in-process harness, not verifiers' `bash`
    assert env.config.agent.runtime.type == "subprocess"  # not verifiers' default remote sandbox


def test_vf_eval_console_script_finds_the_installed_environment(tmp_path, vf_eval):
    flags = ["--env.taskset.tier", "production", "--env.taskset.task.use-student-model", "true"]
    run = vf_eval(ENV_ID, "--dry-run", "-m", "student", "-o", str(tmp_path), *flags, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    env = json.loads(next(tmp_path.rglob("eval.json")).read_text())["env"]
    assert env["taskset"]["id"] == ENV_ID and env["taskset"]["tier"] == "production"
    assert env["taskset"]["task"]["use_student_model"] is True
    assert env["agent"]["runtime"]["type"] == "subprocess"


def test_dataset_has_prompt_answer_info_from_the_project_loader():
    tasks = list(vf.load_environment(env_config(offset=5)).taskset)
    problems = load_gsm8k("test", limit=3, offset=5)
    assert [t.data.id for t in tasks] == [p.id for p in problems] == ["test-5", "test-6", "test-7"]
    for task, problem in zip(tasks, problems, strict=True):
        assert [m.content for m in task.data.prompt] == [m["content"] for m in question_messages(problem)]
        assert task.data.answer == problem.answer
        assert task.data.info == problem.info and "####" in task.data.info["solution"]
        assert task.key == problem.id


async def test_known_right_and_wrong_replies_get_the_expected_rewards():
    task = next(iter(vf.load_environment(env_config()).taskset))  # test-0, gold 18
    weights = RewardWeights()
    cases = {  # reply -> (correct, format)
        task.data.info["solution"]: (1.0, 1.0),
        "She sells 9 eggs for $2 each.\n#### 18.00": (1.0, 1.0),
        "So she makes $18 every day.": (1.0, 0.0),  # right number, no `####` line
        "She sells 9 eggs for $2 each.\n#### 19": (0.0, 1.0),
        "I do not know.": (0.0, 0.0),
    }
    for reply, (correct, fmt) in cases.items():
        trace = scored_trace(task, reply)
        await task.score(trace)
        assert set(trace.rewards) == {"correct", "format"}, reply  # no PRE without use_student_model
        assert trace.rewards["correct"].score == correct, reply
        assert trace.rewards["format"].score == fmt, reply
        assert trace.rewards["correct"].weight == weights.hre and trace.rewards["format"].weight == 0.0
        assert trace.reward == pytest.approx(weights.hre * correct), reply
        assert trace.metrics["answer_found"] == (0.0 if reply == "I do not know." else 1.0)


def test_load_environment_keywords_as_in_the_original():
    import alphazero_llm_trainer

    env = alphazero_llm_trainer.load_environment(
        tier="free",
        use_student_model=True,
        trainer_url="http://127.0.0.1:9",
        hre_weight=1.0,
        format_weight=0.25,
        limit=2,
    )
    cfg = env.config.taskset
    assert (cfg.tier, cfg.limit, cfg.task.use_student_model) == ("free", 2, True)
    settings = cfg.search_settings()
    assert settings.trainer_url == "http://127.0.0.1:9"
    teachers = settings.teacher_endpoints()
    assert teachers and all(t.tier == "free" and t.base_url == settings.openrouter_base_url for t in teachers)
    task = next(iter(env.taskset))
    weights = {fn.__name__: fn._vf_weight for fn in task.hooks("reward")}
    assert weights == {"correct": 1.0, "format": 0.25, "perplexity": RewardWeights().pre}

    custom = [{"name": "t1", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]
    env = alphazero_llm_trainer.load_environment(
        tier="custom", teachers=custom, trainer_url="http://127.0.0.1:9", limit=1
    )
    assert [t.name for t in env.config.taskset.search_settings().teacher_endpoints()] == ["t1"]
    task = next(iter(env.taskset))  # a trainer URL alone switches PRE on, as `use_student_model` does
    assert "perplexity" in [fn.__name__ for fn in task.hooks("reward")]


async def test_perplexity_reward_is_the_students_logprob_gap_to_the_gold_solution():
    with ScriptedServer() as server:  # serves the trainer's POST /logprobs
        scoring = {"use_student_model": True, "trainer_url": server.url}
        env = vf.load_environment(env_config(task=scoring))
        task = next(iter(env.taskset))
        reply = "She sells 9 eggs.\n#### 18"
        trace = scored_trace(task, reply)
        await task.score(trace)
        async with TrainerClient(server.url) as trainer:
            problem = load_gsm8k("test", limit=1)[0]
            items = [
                {"messages": question_messages(problem), "completion": c}
                for c in (reply, task.data.info["solution"])
            ]
            reply_mean, gold_mean = (r.mean for r in (await trainer.logprobs(items)).results)
    assert server.requests.get("/logprobs") == 2  # one call from the reward, one from this test
    pre = trace.rewards["perplexity"]
    assert pre.score == pytest.approx(reply_mean - gold_mean) and pre.score != 0.0
    assert pre.weight == RewardWeights().pre
    assert trace.reward == pytest.approx(RewardWeights().hre * 1.0 + RewardWeights().pre * pre.score)


async def test_vf_eval_run_scores_a_right_and_a_wrong_model(tmp_path):
    """verifiers' own eval runner, in process: harness -> interception -> scripted server -> rewards."""
    from verifiers.v1.cli.eval.runner import run_eval
    from verifiers.v1.configs.cli.eval import EvalConfig

    config = ServerConfig(answer="18", answer_depth=1, wrong_models=["wrong"])  # "#### 18" / "#### 19"
    with ScriptedServer(config) as server:
        results = {}
        for model in ("right", "wrong"):
            cfg = EvalConfig.model_validate(
                {
                    "env": {"taskset": {"id": ENV_ID, "limit": 1}},
                    "model": model,
                    "client": {"base_url": server.v1, "api_key_var": "AZT_TEST_NO_KEY"},
                    "push": False,
                    "rich": None,
                    "output_dir": str(tmp_path / model),
                    "sampling": {"max_tokens": 32, "temperature": 0.0},
                }
            )
            episodes = await run_eval(cfg)
            traces = [t for e in episodes for t in e.traces]
            assert len(traces) == 1 and traces[0].ok, traces[0].errors
            results[model] = traces[0]
            saved = [json.loads(line) for line in next((tmp_path / model).rglob("traces.jsonl")).open()]
            assert len(saved) == 1
    assert results["right"].last_reply == "#### 18" and results["wrong"].last_reply == "#### 19"
    assert {k: r.score for k, r in results["right"].rewards.items()} == {"correct": 1.0, "format": 1.0}
    assert {k: r.score for k, r in results["wrong"].rewards.items()} == {"correct": 0.0, "format": 1.0}
    assert server.models == {"right": 1, "wrong": 1}
