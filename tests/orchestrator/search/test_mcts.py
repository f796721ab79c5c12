import asyncio
import math

import pytest

from orchestrator.clients.llm import LLMPool, RetryPolicy
from orchestrator.clients.trainer import TrainerClient
from orchestrator.gsm8k.data import Problem
from orchestrator.runners.trajectories import grpo_group
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search, run_searches
from orchestrator.search.teachers import TeacherEnsemble
from orchestrator.search.terminal import TerminalChecker
from orchestrator.settings import EndpointSpec, SearchConfig, Settings
from support.line_search import line_config
from support.scripted_server import token_logprobs

PROBLEM = Problem(id="t-0", prompt="What is 6 * 7?", answer="42")


def services(server, pool, trainer=True) -> SearchServices:
    def ep(name):
        return EndpointSpec(name=name, base_url=server.v1, model=name, timeout_s=5)

    return SearchServices(
        pool=pool,
        teachers=TeacherEnsemble([ep("t1"), ep("t2")], seed=0),
        checker=TerminalChecker(pool, ep("checker")),
        student=ep("student"),
        trainer=TrainerClient(server.url, retry=RetryPolicy(max_retries=0)) if trainer else None,
    )


async def search(server, config: SearchConfig, trainer=True, cancel=None):
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        svc = services(server, pool, trainer)
        try:
            return await run_search(PROBLEM, config, svc, cancel), svc
        finally:
            if svc.trainer:
                await svc.trainer.aclose()


def check_invariants(tree, config):
    assert all(n.virtual_loss == 0 for n in tree)
    assert all(n.depth <= config.max_depth and n.path_tokens <= config.max_tokens for n in tree)
    for n in tree:
        if n.children:  # a parent's visits = its own evaluation visits + its children's
            assert n.visits >= sum(tree.nodes[c].visits for c in n.children)
            assert math.isclose(sum(tree.nodes[c].prior for c in n.children), 1.0)


async def test_reaches_terminal_leaves(scripted_server):
    config = line_config(iterations=6, max_depth=4, parallel_simulations=3)
    result, svc = await search(scripted_server, config)
    tree, stats = result.tree, result.stats
    check_invariants(tree, config)
    assert stats["simulations"] == 6 and 1 <= stats["expansions"] <= 6
    assert stats["terminal_leaves"] >= 1 and stats["correct_leaves"] >= 1
    leaves = [n for n in tree if n.terminal]
    assert {n.terminal_reason for n in leaves} == {"answer_line"}
    assert all(n.reward is not None and n.answer in ("42", "43") for n in leaves)
    assert any(n.correct for n in leaves) and any(not n.correct for n in leaves)
    kinds = {n.kind for n in tree}
    assert kinds == {"root", "student", "right", "wrong"}
    assert stats["degraded"] == [] and stats["teacher_errors"] == 0
    assert svc.teachers.snapshot()["t1"]["rewards"] + svc.teachers.snapshot()["t2"]["rewards"] > 0


async def test_priors_from_student_logprobs(scripted_server):
    result, _ = await search(
        scripted_server, line_config(iterations=1, parallel_simulations=1, rollout=False)
    )
    children = result.tree.children(result.tree.root)
    for child in children:  # the scripted server's deterministic log-probs, model "student"
        lps = token_logprobs(child.text, "student")
        assert child.step_logprob == pytest.approx(sum(lps) / len(lps))
    exps = [math.exp(c.step_logprob) for c in children]
    assert [c.prior for c in children] == pytest.approx([e / sum(exps) for e in exps])
    baseline = sum(c.step_logprob for c in children) / len(children)
    assert [c.step_pre for c in children] == pytest.approx([c.step_logprob - baseline for c in children])
    assert all(c.similarity is not None for c in children if c.kind != "student")
    assert all(c.similarity is None for c in children if c.kind == "student")


async def test_uniform_priors_without_trainer(scripted_server):
    result, _ = await search(
        scripted_server, line_config(iterations=2, parallel_simulations=1), trainer=False
    )
    children = result.tree.children(result.tree.root)
    assert [c.prior for c in children] == pytest.approx([1 / len(children)] * len(children))
    assert any(d.startswith("uniform_priors") for d in result.stats["degraded"])
    assert all(c.step_pre == 0.0 for c in children)


async def test_depth_limit(scripted_server):
    scripted_server.config.answer_depth = 50
    config = line_config(iterations=10, max_depth=2, parallel_simulations=2, rollout=False)
    result, _ = await search(scripted_server, config)
    check_invariants(result.tree, config)
    assert result.stats["max_depth_reached"] == 2
    assert {n.terminal_reason for n in result.tree if n.terminal} == {"depth_limit"}


async def test_token_limit(scripted_server):
    scripted_server.config.answer_depth = 50
    config = line_config(iterations=12, max_depth=20, max_tokens=16, chunk_tokens=6, parallel_simulations=2)
    result, _ = await search(scripted_server, config)
    check_invariants(result.tree, config)
    assert "token_limit" in {n.terminal_reason for n in result.tree if n.terminal}
    for entry in scripted_server.log:
        if entry["path"] == "/v1/chat/completions" and "max_tokens" in entry["payload"]:
            assert entry["payload"]["max_tokens"] <= 16


async def test_iteration_limit_and_uct(scripted_server):
    config = line_config(iterations=3, parallel_simulations=1, selection="uct", rollout=False)
    result, _ = await search(scripted_server, config)
    assert result.stats["simulations"] == 3 and result.stats["expansions"] <= 3
    # one expansion = student + right + wrong + one /logprobs
    assert scripted_server.stats()["total"] == result.stats["requests"] <= 3 * 4


async def test_cancel_returns_the_tree_so_far(scripted_server):
    scripted_server.config.latency_ms = 40
    cancel = asyncio.Event()
    config = line_config(iterations=1000, parallel_simulations=2)
    task = asyncio.create_task(search(scripted_server, config, cancel=cancel))
    await asyncio.sleep(0.3)
    cancel.set()
    result, _ = await asyncio.wait_for(task, 10)
    assert result.stats["cancelled"] is True and result.stats["simulations"] < 1000
    assert all(n.virtual_loss == 0 for n in result.tree)


async def test_many_trees_and_group(scripted_server):
    scripted_server.config.answer_depth = 2
    problems = [Problem(id=f"t-{i}", prompt=f"What is {i} + 40?", answer="42") for i in range(5)]
    async with LLMPool(max_in_flight=4, retry=RetryPolicy(max_retries=0)) as pool:
        svc = services(scripted_server, pool)
        results = await run_searches(
            problems, line_config(iterations=4, parallel_simulations=2), svc, max_trees_in_flight=2
        )
        await svc.trainer.aclose()
        assert pool.max_in_flight <= 4
    assert [r.tree.problem_id for r in results] == [p.id for p in problems]
    for r in results:
        group = grpo_group(r.tree, teacher_paths="group")  # every path a member: advantages sum to 0
        assert len(group) >= 2 and abs(sum(g.advantage for g in group)) < 1e-6
        guided = grpo_group(r.tree)  # the student's answers around their own mean; teacher text beside them
        assert guided and abs(sum(g.advantage for g in guided if g.source == "student")) < 1e-6
        assert r.tree.to_json()["nodes"][0]["visits"] == r.tree.root.visits


def test_config_and_services_from_settings():
    settings = Settings(max_tree_depth=3, num_mcts_iterations=5, max_tokens=100, chunk_tokens=10)
    config = SearchConfig.from_settings(settings, parallel_simulations=2)
    assert (config.max_depth, config.iterations, config.max_tokens, config.chunk_tokens) == (3, 5, 100, 10)
    assert config.parallel_simulations == 2 and config.rewards.hre == 1.0 and config.shape == "fork"
    svc = SearchServices.from_settings(settings, pool=LLMPool())
    assert svc.student.model == "student" and list(svc.teachers.states) == ["embedded-base"]
    assert svc.trainer is not None and svc.checker.endpoint.model == "base"
    assert SearchServices.from_settings(Settings(trainer_url=""), pool=LLMPool()).trainer is None


@pytest.mark.parametrize("rollouts", ["best", "all"])
async def test_rollouts_best_or_all(scripted_server, rollouts):
    config = line_config(iterations=1, parallel_simulations=1, rollouts=rollouts)
    result, _ = await search(scripted_server, config)
    tree = result.tree
    children = tree.children(tree.root)
    open_children = [c for c in children if not c.terminal]
    rolled = [c for c in children if c.rollout is not None]
    if rollouts == "best":
        assert rolled == [max(open_children, key=lambda c: c.prior)]
    else:
        assert rolled == open_children
    assert result.stats["rollouts"] == len(rolled)
    assert all(c.visits == 1 for c in rolled) and tree.root.visits == len(rolled)
    assert all("####" in c.rollout for c in rolled)  # the scripted student writes on to an answer


async def test_teachers_are_credited_with_their_childrens_values(scripted_server):
    config = line_config(iterations=4, parallel_simulations=1, rollouts="all")
    result, svc = await search(scripted_server, config)
    snap = svc.teachers.snapshot()
    teacher_visits = sum(n.visits for n in result.tree if n.kind in ("right", "wrong"))
    assert snap["t1"]["rewards"] + snap["t2"]["rewards"] >= teacher_visits > 0
    assert any(s["score"] != 0.0 for s in snap.values())


@pytest.mark.parametrize("reply,terminal", [("yes", True), ("no", False)])
async def test_checker_decides_when_the_rules_are_unsure(scripted_server, reply, terminal):
    scripted_server.config.final_style = "sentence"  # "So in total she has 42 apples."
    scripted_server.config.answer_depth = 2
    scripted_server.config.checker_reply = reply
    config = line_config(iterations=3, parallel_simulations=1, max_depth=3, rollout=False)
    result, _svc = await search(scripted_server, config)
    sentences = [n for n in result.tree if n.text.startswith("So in total")]
    assert sentences and result.stats["checker_calls"] >= 1
    assert result.stats["checker_calls"] == scripted_server.stats()["models"]["checker"]
    if terminal:
        assert all(n.terminal and n.terminal_reason in ("checker", "checker_cached") for n in sentences)
        assert any(n.correct for n in sentences)  # flexible extraction of "42 apples."
    else:
        assert not any(n.terminal_reason in ("checker", "checker_cached") for n in result.tree)


async def test_searches_share_one_scorer(scripted_server):
    problems = [Problem(id=f"t-{i}", prompt=f"What is {i} + 40?", answer="42") for i in range(4)]
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        svc = services(scripted_server, pool)
        results = await run_searches(problems, line_config(iterations=4, parallel_simulations=2), svc)
        await svc.trainer.aclose()
    scorer = svc.scorer
    assert scorer is svc.scorer and scorer.trainer is svc.trainer
    assert scripted_server.stats()["requests"]["/logprobs"] == scorer.requests <= scorer.calls
    assert all(not any(d.startswith("uniform_priors") for d in r.stats["degraded"]) for r in results)
