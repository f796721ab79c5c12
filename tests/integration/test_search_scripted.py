"""The search over real HTTP: the scripted OpenAI-compatible server runs as its own process on 127.0.0.1 and
is
steered through its admin routes (teachers "t1" and "t2", the student and the checker are models on it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.clients.llm import LLMPool, RetryPolicy
from orchestrator.clients.trainer import TrainerClient
from orchestrator.gsm8k.data import Problem
from orchestrator.runners.trajectories import grpo_group, trajectories
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search
from orchestrator.search.teachers import TeacherEnsemble
from orchestrator.search.terminal import TerminalChecker
from orchestrator.settings import EndpointSpec
from support.line_search import line_config
from support.scripted_server import admin

pytestmark = pytest.mark.integration
SERVER = Path(__file__).resolve().parents[1] / "support" / "scripted_server.py"
PROBLEM = Problem(id="s-0", prompt="Natalia sold 6 clips to each of 7 friends. How many clips?", answer="42")


@pytest.fixture(scope="module")
def server_url():
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def url(server_url):
    admin(server_url, "reset")
    admin(server_url, "config", {"answer": "42", "answer_depth": 3, "latency_ms": 0})
    return server_url


async def search(url, config, teacher_timeout=5.0):
    def ep(name, timeout=5.0):
        return EndpointSpec(name=name, base_url=url + "/v1", model=name, timeout_s=timeout)

    async with (
        LLMPool(max_in_flight=64, retry=RetryPolicy(max_retries=1, backoff_base_s=0.01)) as pool,
        TrainerClient(url, retry=RetryPolicy(max_retries=1, backoff_base_s=0.01)) as trainer,
    ):
        svc = SearchServices(
            pool=pool,
            teachers=TeacherEnsemble([ep("t1", teacher_timeout), ep("t2", teacher_timeout)], seed=0),
            checker=TerminalChecker(pool, ep("checker")),
            student=ep("student"),
            trainer=trainer,
        )
        return await run_search(PROBLEM, config, svc), svc


async def test_search_reaches_terminal_leaves_within_limits(url):
    config = line_config(iterations=8, max_depth=4, max_tokens=200, chunk_tokens=16, parallel_simulations=4)
    result, _ = await search(url, config)
    tree, stats = result.tree, result.stats
    assert stats["simulations"] == 8 and stats["expansions"] <= 8 and not stats["degraded"]
    assert all(n.depth <= 4 and n.path_tokens <= 200 and n.virtual_loss == 0 for n in tree)
    paths = trajectories(tree)
    assert paths and all(p.steps[-1].startswith("####") for p in paths)
    assert any(p.correct for p in paths) and any(not p.correct for p in paths)
    group = grpo_group(tree, teacher_paths="group")  # every path a member of the group, in path order
    assert len(group) == len(paths) >= 2
    assert abs(sum(g.advantage for g in group)) < 1e-6
    assert max(g.advantage for g in group) > 0 > min(g.advantage for g in group)
    correct_adv = [g.advantage for g, p in zip(group, paths, strict=True) if p.correct]
    wrong_adv = [g.advantage for g, p in zip(group, paths, strict=True) if not p.correct]
    assert max(correct_adv) > max(wrong_adv)  # HRE dominates the reward
    assert {g.weight for g in group} <= {1.0, 0.5}
    guided = grpo_group(tree)  # the default: the student's answers around their own mean
    own = [g for g in guided if g.source == "student"]
    assert guided and abs(sum(g.advantage for g in own)) < 1e-6
    tree_items = grpo_group(tree, "tree")
    assert all(abs(i.advantage) <= 5.0 for i in tree_items) and tree_items
    data = tree.to_json()
    assert len(data["nodes"]) == stats["nodes"] and all("reward" in n for n in data["nodes"])


async def test_search_goes_on_when_a_teacher_returns_500s(url):
    admin(url, "rules", {"rules": [{"mode": "error", "status": 500, "model": "t1"}]})
    result, svc = await search(url, line_config(iterations=8, max_depth=4, parallel_simulations=4))
    stats = result.stats
    assert stats["teacher_errors"] >= 1 and "teacher_failover" in stats["degraded"]
    assert stats["terminal_leaves"] >= 1 and grpo_group(result.tree)
    teacher_nodes = [n for n in result.tree if n.kind in ("right", "wrong")]
    assert teacher_nodes and all(n.source == "t2" for n in teacher_nodes)
    assert svc.teachers.snapshot()["t1"]["failures"] >= 1
    assert admin(url, "stats")["models"].get("t1", 0) >= 1


async def test_search_goes_on_when_a_teacher_hangs_past_its_timeout(url):
    admin(url, "rules", {"rules": [{"mode": "hang", "model": "t2"}]})
    result, svc = await search(
        url, line_config(iterations=6, max_depth=4, parallel_simulations=3), teacher_timeout=0.3
    )
    stats = result.stats
    assert stats["teacher_errors"] >= 1 and any("timeout" in e for e in stats["errors"])
    assert stats["terminal_leaves"] >= 1
    assert all(n.source == "t1" for n in result.tree if n.kind in ("right", "wrong"))
    assert not svc.teachers.snapshot()["t2"]["healthy"]  # resting after repeated timeouts


async def test_student_without_logprobs_and_dropped_connections(url):
    admin(
        url,
        "rules",
        {"rules": [{"mode": "no_logprobs", "model": "student"}, {"mode": "drop", "model": "t1", "times": 2}]},
    )
    result, _ = await search(url, line_config(iterations=4, max_depth=4, parallel_simulations=2))
    assert "student_logprobs_unavailable" in result.stats["degraded"]
    assert result.stats["expansions"] >= 1
    for node in result.tree:
        if node.children:  # the trainer's /logprobs still scores every step, so priors are real
            assert sum(result.tree.nodes[c].prior for c in node.children) == pytest.approx(1.0)
