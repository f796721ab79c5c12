"""The fork search (search/fork.py, the default shape) and its pure parts (lines.py, fork_tree.py): answers cut
into lines with their tokens' log-probs, prefixes merged, PUCT over internal line-nodes with virtual loss, the
backup, the gold answer for trees the student did not solve, the checker only where the rules are unsure, token accounting.
The searches run against the scripted OpenAI-compatible server (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import math

import pytest

from orchestrator.clients.llm import LLMPool, RetryPolicy
from orchestrator.gsm8k.data import Problem
from orchestrator.runners.trajectories import grpo_group, trajectories
from orchestrator.search.fork import share
from orchestrator.search.fork_tree import Writer, add_answer, select_forks
from orchestrator.search.lines import Line, split_answer
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search
from orchestrator.search.teachers import TeacherEnsemble
from orchestrator.search.terminal import TerminalChecker
from orchestrator.search.tree import STUDENT, Tree, backprop
from orchestrator.settings import EndpointSpec, SearchConfig
from support.scripted_server import ServerConfig

PROBLEM = Problem(id="t-0", prompt="What is 6 * 7?", answer="42")
STUDENT_WRITER = Writer(STUDENT, "student")


# --- lines -----------------------------------------------------------------------------------------------------
def test_each_token_goes_to_the_line_it_starts_on():
    text = "She has 3.\n\nSo 6.\n#### 6"
    tokens = ["She", " has", " 3", ".\n\n", "So", " 6", ".\n", "####", " 6", "<|im_end|>"]
    logprobs = [-0.1, -0.2, -0.3, -0.4, -1.0, -2.0, -3.0, -0.5, -0.5, -0.0]
    lines = split_answer(text, tokens, logprobs)
    assert [line.text for line in lines] == ["She has 3.", "So 6.", "#### 6"]
    assert [line.logprobs for line in lines] == [
        [-0.1, -0.2, -0.3, -0.4],
        [-1.0, -2.0, -3.0],
        [-0.5, -0.5, 0.0],
    ]
    assert sum(len(line.logprobs) for line in lines) == len(tokens)  # every token counted once
    assert lines[1].surprisal == pytest.approx(2.0)


def test_sampled_ids_follow_their_tokens_into_lines():
    """With the sampler's ids (a student server's return_token_ids) every line keeps the ids of its own tokens, one
    per log-prob, and the lines' ids one after another are the sample's ids: blank lines' tokens go to the next
    line, trailing ones to the last."""
    text = "\n\nShe has 3.\n\nSo 6.\n#### 6\n\n"
    tokens = ["\n\n", "She", " has", " 3", ".\n\n", "So", " 6", ".\n", "####", " 6", "\n\n", "<|im_end|>"]
    ids = list(range(100, 100 + len(tokens)))
    logprobs = [-0.01 * i for i in range(len(tokens))]
    lines = split_answer(text, tokens, logprobs, ids)
    assert [line.text for line in lines] == ["She has 3.", "So 6.", "#### 6"]
    assert [line.token_ids for line in lines] == [
        [100, 101, 102, 103, 104],
        [105, 106, 107],
        [108, 109, 110, 111],
    ]
    assert [len(line.token_ids or []) for line in lines] == [len(line.logprobs) for line in lines]
    assert [i for line in lines for i in line.token_ids or []] == ids
    # ids that do not match the tokens one for one are not kept (the lines' log-probs still are)
    assert all(line.token_ids is None for line in split_answer(text, tokens, logprobs, ids[:-1]))
    assert all(line.token_ids is None for line in split_answer(text, tokens, logprobs))


def test_lines_without_tokens_and_word_tokens():
    plain = split_answer("  a = 1  \n\n\n#### 1\n")
    assert [(line.text, line.mean_logprob) for line in plain] == [("a = 1", None), ("#### 1", None)]
    words = split_answer("Step 1: x y\n#### 4", ["Step", "1:", "x", "y", "####", "4"], [-1.0] * 6)
    assert [len(line.logprobs) for line in words] == [4, 2]
    assert split_answer("") == [] and split_answer("\n \n") == []


def test_share_splits_a_total_by_weight():
    assert share(10, [1, 1, 2]) == [2, 2, 6] and sum(share(7, [3, 1])) == 7
    assert share(2, [5, 5, 5]) == [0, 0, 2] and share(0, []) == []


# --- the tree --------------------------------------------------------------------------------------------------
def lines(*texts: str, logprob: float | None = None) -> list[Line]:
    return [Line(t, [] if logprob is None else [logprob]) for t in texts]


def empty_tree() -> Tree:
    return Tree("t-0", "q?", "1", [{"role": "user", "content": "q?"}])


def test_answers_that_share_a_prefix_share_its_nodes():
    tree = empty_tree()

    def add(*texts: str):
        return add_answer(
            tree,
            tree.root,
            lines(*texts),
            STUDENT_WRITER,
            token_counts=[3] * len(texts),
            finish_reason="stop",
        )

    a_leaf, a_new = add("a", "b", "#### 1")
    _, b_new = add("a", "b", "#### 2")
    _, c_new = add("a", "c", "#### 1")
    again, again_new = add("a", "b", "#### 1")  # the same answer again: the same leaf, nothing new
    short, short_new = add("a", "b")  # ends where others go on: a leaf "b" beside the internal "b"
    assert (len(a_new), len(b_new), len(c_new), again_new, len(short_new)) == (3, 1, 2, [], 1)
    assert again is a_leaf and len(tree) == 1 + 3 + 1 + 2 + 1
    a = tree.children(tree.root)
    assert [n.text for n in a] == ["a"] and [n.text for n in tree.children(a[0])] == ["b", "c", "b"]
    internal_b, leaf_b = tree.children(a[0])[0], tree.children(a[0])[2]
    assert not internal_b.terminal and leaf_b.terminal and short is leaf_b and not leaf_b.children
    assert all(n.terminal == (not n.children) for n in tree if n.id)  # leaves and internal nodes never mix
    assert a_leaf.path_tokens == 9 and a_leaf.finish_reason == "stop" and a[0].finish_reason is None
    with pytest.raises(ValueError):
        add()


def scored(tree: Tree, texts: list[str], reward: float, logprob: float) -> None:
    leaf, _ = add_answer(
        tree,
        tree.root,
        lines(*texts, logprob=logprob),
        STUDENT_WRITER,
        token_counts=[4] * len(texts),
        finish_reason="stop",
    )
    leaf.reward, leaf.correct = reward, reward > 0.5
    backprop(tree.path(leaf), reward)


def test_puct_picks_by_value_then_surprisal_and_spreads_with_virtual_loss():
    tree = empty_tree()
    scored(tree, ["x1", "x2", "#### 0"], 0.0, logprob=-0.5)
    scored(tree, ["y1", "y2", "#### 1"], 1.0, logprob=-0.5)
    x1, x2, _, y1, y2, _ = tree.nodes[1:]
    y2.step_logprob = -3.0  # the student was unsure writing the line after y1: fork at y1
    x2.step_logprob = -2.0  # and after x1
    paths = select_forks(
        tree, 3, c_puct=1.5, vl_value=1.0, prior_temperature=1.0, max_tokens=256, min_room=16
    )
    assert [p[-1].text for p in paths] == ["y1", "x1"]  # value first; then no second pick on a picked path
    assert [n.id for n in paths[0]] == [0, y1.id]
    assert (tree.root.virtual_loss, y1.virtual_loss, x1.virtual_loss, y2.virtual_loss) == (2, 1, 1, 0)
    assert math.isclose(sum(n.prior for n in (x1, x2, y1, y2)), 1.0)
    assert y1.prior > y2.prior and x1.prior > x2.prior  # surprisal of the next line: 3.0 > 0.5, 2.0 > 0.5


def test_selection_skips_lines_without_room_and_falls_back_to_uniform_priors():
    tree = empty_tree()
    scored(tree, ["x1", "x2", "#### 0"], 0.0, logprob=-0.5)
    tree.nodes[2].step_logprob = None  # a line without sampled log-probs (teacher text)
    paths = select_forks(tree, 2, c_puct=1.5, vl_value=1.0, prior_temperature=1.0, max_tokens=24, min_room=16)
    assert [p[-1].text for p in paths] == ["x1"]  # x2 ends at 8 tokens of 24: 16 left; x1 at 4: 20 left
    # x2's surprisal is known, x1's (followed by a line without log-probs) is the mean of the known ones
    assert tree.nodes[1].prior == tree.nodes[2].prior == 0.5
    tree.nodes[3].step_logprob = None  # no line has sampled log-probs: uniform
    select_forks(tree, 2, c_puct=1.5, vl_value=1.0, prior_temperature=1.0, max_tokens=24, min_room=16)
    assert tree.nodes[1].prior == tree.nodes[2].prior == 0.5
    assert (
        select_forks(tree, 2, c_puct=1.5, vl_value=1.0, prior_temperature=1.0, max_tokens=8, min_room=16)
        == []
    )


# --- the search against the scripted server ---------------------------------------------------------------------
def services(server, pool) -> SearchServices:
    def ep(name):
        return EndpointSpec(name=name, base_url=server.v1, model=name, timeout_s=5)

    return SearchServices(
        pool=pool,
        teachers=TeacherEnsemble([ep("t1")], seed=0),
        checker=TerminalChecker(pool, ep("checker")),
        student=ep("student"),
        trainer=None,  # the fork search needs no /logprobs
    )


async def fork(server, cancel=None, **fields):
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        svc = services(server, pool)
        return await run_search(PROBLEM, SearchConfig(**fields), svc, cancel), svc


def check_tree(tree: Tree) -> None:
    assert all(n.virtual_loss == 0 for n in tree)
    for n in tree:
        if n.id and n.children:  # an internal line: every answer through it went on to a child
            assert n.visits == sum(tree.nodes[c].visits for c in n.children) and not n.terminal
        if n.terminal:
            assert not n.children and n.reward is not None and n.visits >= 1
            assert math.isclose(n.value, n.reward)  # the same answer, backed up once per time it was written
    assert tree.root.visits == sum(tree.nodes[c].visits for c in tree.root.children)


async def test_the_default_search_round_by_round(scripted_server):
    result, svc = await fork(scripted_server)
    tree, stats = result.tree, result.stats
    check_tree(tree)
    chats = [e for e in scripted_server.log if e["path"] == "/v1/chat/completions"]
    students = [e["payload"] for e in chats if e["model"] == "student"]
    teachers = [e["payload"] for e in chats if e["model"] == "t1"]
    assert "/logprobs" not in scripted_server.requests  # priors come from the sampled log-probs
    root_ask, *fork_asks = students
    assert root_ask["n"] == 4 and root_ask["logprobs"] is True and root_ask["temperature"] == 1.0
    assert root_ask["messages"][-1]["role"] == "user" and root_ask.get("stop") is None
    assert root_ask["max_tokens"] == 256
    assert len(fork_asks) == 2 and all(a["n"] == 2 and a["continue_final_message"] for a in fork_asks)
    assert all(a["messages"][-1]["role"] == "assistant" and a["logprobs"] is True for a in fork_asks)
    assert len(teachers) == 2 and all(
        "Write the rest of a correct solution" in t["messages"][-1]["content"] for t in teachers
    )
    partials = sorted(a["messages"][-1]["content"] for a in fork_asks)
    assert all(p.endswith("\n") and p.startswith("Step 1:") for p in partials) and partials[0] != partials[1]
    assert (stats["shape"], stats["rounds"], stats["forks"], stats["answers"]) == ("fork", 2, 2, 4 + 4 + 2)
    assert stats["requests"] == 5 and stats["checker_calls"] == 0 and not stats["gold_added"]
    assert stats["tokens"] == stats["student_tokens"] + stats["teacher_tokens"]
    assert stats["teacher_tokens"] > 0 and stats["student_tokens"] > stats["teacher_tokens"]
    leaves = [n for n in tree if n.terminal]
    assert {n.answer for n in leaves} == {"42", "43"} and stats["correct_leaves"] >= 2
    assert all(n.terminal_reason == "answer_line" for n in leaves)
    teacher_leaves = [n for n in leaves if any(s.source == "t1" for s in tree.steps(n))]
    assert teacher_leaves and all(n.correct for n in teacher_leaves)
    assert svc.teachers.states["t1"].rewards == len(teacher_leaves)  # the teacher credited per answer
    # the leaves' line token counts add up to the student's usage (the log-probs' tokens, one per word here)
    student_lines = [n for n in tree if n.source == STUDENT]
    assert sum(n.tokens for n in student_lines) <= stats["student_tokens"]
    group = grpo_group(tree)
    assert len(group) == len(trajectories(tree))  # the student's answers are right and wrong: all train
    own = [i for i in group if i.source == STUDENT]
    assert abs(sum(i.advantage for i in own)) < 1e-9  # around the student's own mean; teacher text on top


async def test_generated_tokens_are_the_servers_usage_by_source(scripted_server):
    result, _ = await fork(scripted_server, seed=7)
    stats = result.stats
    asked = [e for e in scripted_server.log if e["path"] == "/v1/chat/completions"]
    # Merged lines hide how much each request wrote, so the same requests are asked again (the script is a pure
    # function of the request) and the server's own usage is summed by who was asked.
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        usage = {"student": 0, "t1": 0}
        for e in asked:
            payload = {k: v for k, v in e["payload"].items() if k != "model"}
            endpoint = EndpointSpec(name=e["model"], base_url=scripted_server.v1, model=e["model"])
            again = await pool.chat(endpoint, payload.pop("messages"), **payload)
            usage[e["model"]] += again.usage["completion_tokens"]
    assert (stats["student_tokens"], stats["teacher_tokens"]) == (usage["student"], usage["t1"])


async def test_a_tree_with_no_correct_answer_gets_the_teachers_gold_answer(scripted_server):
    scripted_server.config = ServerConfig(wrong_models=["student"])
    result, _ = await fork(scripted_server, n_teacher_right=0)
    tree, stats = result.tree, result.stats
    check_tree(tree)
    gold = [n for n in tree if n.terminal and n.correct]
    assert stats["gold_added"] and len(gold) == 1 and stats["correct_leaves"] == 1
    assert all(n.source == "t1" and n.kind == "right" for n in tree.steps(gold[0]))
    assert tree.steps(gold[0])[0].parent == 0  # a whole answer from the question
    items = grpo_group(tree)
    best = max(items, key=lambda i: i.advantage)
    assert best.source == "t1" and best.advantage > 0.5 and best.weight == 1.0

    scripted_server.reset()
    without, _ = await fork(scripted_server, n_teacher_right=0, teacher_gold=False)
    assert not without.stats["gold_added"] and without.stats["correct_leaves"] == 0
    assert grpo_group(without.tree) == []  # all wrong: the group is dropped
    assert "t1" not in scripted_server.models


async def test_gold_too_when_only_a_teacher_continuation_is_right(scripted_server):
    """A right teacher continuation of the student's prefix is not the student solving the problem: the tree
    still gets the whole gold answer from the question (the clean worked solution the guided items train on)."""
    scripted_server.config = ServerConfig(wrong_models=["student"])
    result, _ = await fork(scripted_server)  # the defaults: a "right" teacher continuation at each fork
    tree, stats = result.tree, result.stats
    check_tree(tree)
    right = [n for n in tree if n.terminal and n.correct]
    continuations = [n for n in right if tree.steps(n)[0].source == STUDENT]
    golds = [n for n in right if tree.steps(n)[0].parent == 0 and tree.steps(n)[0].source == "t1"]
    assert continuations and len(golds) == 1 and stats["gold_added"]
    assert all(any(s.source == "t1" for s in tree.steps(n)) for n in right)  # the student wrote none of them
    items = grpo_group(tree)
    assert items and all(
        i.source == "t1" and i.advantage > 0.5 for i in items
    )  # no student answer pushed down
    assert sorted(i.context == "" for i in items) == [False] * len(continuations) + [True]


async def test_no_gold_when_the_student_found_a_correct_answer(scripted_server):
    result, _ = await fork(scripted_server, n_teacher_right=0)
    assert result.stats["correct_leaves"] >= 1 and not result.stats["gold_added"]
    assert "t1" not in scripted_server.models  # no teacher was asked at all


@pytest.mark.parametrize("use_checker, reply", [(False, "no"), (True, "no"), (True, "yes")])
async def test_the_checker_judges_only_answers_the_rules_are_unsure_of(scripted_server, use_checker, reply):
    scripted_server.config = ServerConfig(final_style="sentence", checker_reply=reply)
    result, _ = await fork(scripted_server, use_checker=use_checker, iterations=0, teacher_gold=False)
    leaves = [n for n in result.tree if n.terminal]
    assert len(leaves) == 4
    asked = scripted_server.models.get("checker", 0)
    if not use_checker:  # the rules alone: scored on the last number
        assert asked == 0 and {n.answer for n in leaves} == {"42", "43"}
        assert {n.terminal_reason for n in leaves} == {"answer_end"}
    elif reply == "no":  # "no final answer stated": no answer at all
        assert asked == 4 and result.stats["checker_calls"] == 4
        assert all(n.answer is None and not n.correct for n in leaves)
        assert {n.terminal_reason for n in leaves} == {"checker_no_answer"}
    else:
        assert asked == 4 and sum(n.correct for n in leaves) == 2
        assert {n.terminal_reason for n in leaves} == {"checker"}


async def test_answer_lines_never_ask_the_checker(scripted_server):
    result, _ = await fork(scripted_server, use_checker=True)
    assert "checker" not in scripted_server.models and result.stats["checker_calls"] == 0


async def test_plain_sampling_is_the_root_alone(scripted_server):
    result, _ = await fork(scripted_server, root_samples=8, iterations=0, teacher_gold=False)
    tree, stats = result.tree, result.stats
    assert stats["requests"] == 1 and stats["forks"] == 0 and stats["answers"] == 8
    assert len(trajectories(tree)) == len(
        {tuple(n.text for n in tree.steps(leaf)) for leaf in tree if leaf.terminal}
    )


async def test_answers_cut_by_the_budget_and_no_room_to_fork(scripted_server):
    scripted_server.config = ServerConfig(step_words=10)  # 2 lines of 9 words and "#### 42": 20 > 16
    result, _ = await fork(scripted_server, max_tokens=16, teacher_gold=False)
    tree, stats = result.tree, result.stats
    check_tree(tree)
    assert stats["forks"] == 0  # every line ends with less than 16 tokens of room left
    assert {n.terminal_reason for n in tree if n.terminal} == {"token_limit"}
    assert all(n.finish_reason == "length" for n in tree if n.terminal)


async def test_cancel_returns_the_tree_so_far(scripted_server):
    scripted_server.config = ServerConfig(latency_ms=400)
    cancel = asyncio.Event()
    task = asyncio.create_task(fork(scripted_server, cancel=cancel))
    await asyncio.sleep(0.6)  # round 0 is in, the forks are in flight
    cancel.set()
    result, _ = await asyncio.wait_for(task, 5)
    assert result.stats["cancelled"] and result.stats["answers"] == 4
    assert all(n.virtual_loss == 0 for n in result.tree)
