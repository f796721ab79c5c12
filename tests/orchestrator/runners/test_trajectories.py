import math

import pytest

from orchestrator.runners.trajectories import grpo_group, rescued, trajectories, zscore
from orchestrator.search.tree import Node, Tree, backprop


def scored_tree() -> Tree:
    """root -> a (student) -> a1 "#### 42" (reward 1.0)
         -> a2 "#### 41" (reward 0.0)
    root -> b (teacher t1, right) -> b1 "#### 42" (reward 0.5)
    root -> c (teacher t1, wrong), not terminal: no trajectory."""
    tree = Tree("p-0", "q?", "42", [{"role": "user", "content": "q?"}])
    a = tree.add_child(tree.root, "A", "student", "student")
    b = tree.add_child(tree.root, "B", "t1", "right")
    tree.add_child(tree.root, "C", "t1", "wrong")
    for parent, text, reward in ((a, "#### 42", 1.0), (a, "#### 41", 0.0), (b, "#### 42", 0.5)):
        leaf = tree.add_child(parent, text, "student", "student")
        leaf.terminal, leaf.reward, leaf.correct, leaf.answer = True, reward, reward > 0, text[5:]
        backprop(tree.path(leaf), reward)
    return tree


def test_trajectories():
    paths = trajectories(scored_tree())
    assert [t.text for t in paths] == ["A\n#### 42", "A\n#### 41", "B\n#### 42"]
    assert [t.reward for t in paths] == [1.0, 0.0, 0.5]
    assert paths[2].sources == ["t1", "student"] and paths[2].path_code == "1s"
    assert paths[0].on_policy and not paths[2].on_policy


def test_zscore_hand_computed():
    # mean 0.5, population std sqrt(1/6) = 0.408248
    adv = zscore([1.0, 0.0, 0.5])
    assert adv == pytest.approx([1.224745, -1.224745, 0.0], abs=1e-5)
    assert zscore([0.3, 0.3]) == [0.0, 0.0]
    assert zscore([]) == []
    clipped = zscore([0.0] * 99 + [1.0], clip=5.0)
    assert max(clipped) == 5.0  # unclipped it would be 9.95


def test_flat_group_is_reward_minus_mean():
    items = grpo_group(scored_tree(), "flat", teacher_weight=0.5)
    assert [i.completion for i in items] == ["A\n#### 42", "A\n#### 41", "B\n#### 42"]
    assert [i.advantage for i in items] == pytest.approx([0.5, -0.5, 0.0])  # mean 0.5, no std scaling
    assert [i.weight for i in items] == [1.0, 1.0, 0.5]
    assert [i.source for i in items] == ["student", "student", "mixed:t1,student"]
    trainer_item = items[2].to_trainer_item()
    assert trainer_item == {
        "messages": [{"role": "user", "content": "q?"}],
        "context": "",
        "completion": "B\n#### 42",
        "advantage": items[2].advantage,
        "weight": 0.5,
    }
    assert [i.weight for i in grpo_group(scored_tree())] == [1.0, 1.0, 1.0]  # teacher_weight 1 by default


def test_flat_group_scaled_is_the_zscore():
    items = grpo_group(scored_tree(), "flat", scale=True)
    assert sum(i.advantage for i in items) == pytest.approx(0.0, abs=1e-9)
    assert items[0].advantage == pytest.approx(1.224745, abs=1e-5)


def test_groups_of_equal_correctness_are_dropped_whatever_their_tie_breaks():
    """Three wrong answers with rewards that differ only in the dense terms: z-scored they would become
    advantages of +-1.2 (the blow-up that drove the early collapses); the group is dropped instead."""
    tree = Tree("p-1", "q?", "42", [{"role": "user", "content": "q?"}])
    for text, reward in (("#### 41", -0.01), ("#### 40", -0.02), ("#### 39", -0.03)):
        leaf = tree.add_child(tree.root, text, "student", "student")
        leaf.terminal, leaf.reward, leaf.correct = True, reward, False
        backprop(tree.path(leaf), reward)
    assert len(trajectories(tree)) == 3
    assert grpo_group(tree) == [] and grpo_group(tree, "tree") == [] and grpo_group(tree, scale=True) == []
    all_right = scored_tree()
    for leaf in all_right:
        if leaf.terminal:
            leaf.correct = True
    assert grpo_group(all_right) == []
    assert len(grpo_group(all_right, "rejection")) == 3  # rejection keeps correct paths, a signal of its own


def test_rejection_mode_keeps_each_distinct_correct_path_with_advantage_one():
    tree = scored_tree()
    twin = tree.add_child(tree.nodes[1], "#### 42", "student", "student")  # the same text as a1 again
    twin.terminal, twin.reward, twin.correct, twin.answer = True, 1.0, True, "42"
    bare = tree.add_child(tree.root, "#### 42", "t1", "right")  # correct, but no worked line
    bare.terminal, bare.reward, bare.correct, bare.answer = True, 1.0, True, "42"
    items = grpo_group(tree, "rejection", teacher_weight=0.5)
    assert [i.completion for i in items] == ["A\n#### 42", "B\n#### 42"]
    assert [i.advantage for i in items] == [1.0, 1.0] and [i.weight for i in items] == [1.0, 0.5]


def test_tree_mode_is_local_plus_global_value_per_segment():
    tree = scored_tree()
    items = {i.node_id: i for i in grpo_group(tree, "tree", teacher_weight=0.5)}
    # root V = 1.5/3 = 0.5; a V = 1.0/2 = 0.5; b V = b1 V = 0.5; leaves a1 1.0, a2 0.0
    # segments: [a], [a1], [a2], and [b, b1] (b has one scored child: one chain)
    assert sorted(items) == [1, 4, 5, 6]
    assert items[1].advantage == pytest.approx(0.0) and items[1].completion == "A" and items[1].context == ""
    assert items[4].advantage == pytest.approx((1.0 - 0.5) + (1.0 - 0.5)) and items[4].context == "A\n"
    assert items[5].advantage == pytest.approx((0.0 - 0.5) + (0.0 - 0.5))
    b_chain = items[6]
    assert (
        b_chain.completion == "B\n#### 42" and b_chain.context == "" and b_chain.advantage == pytest.approx(0)
    )
    assert b_chain.weight == 0.5 and b_chain.source == "mixed:t1,student" and items[1].weight == 1.0
    assert 3 not in items  # not on a scored trajectory
    clipped = {i.node_id: i.advantage for i in grpo_group(tree, "tree", clip=0.2)}
    assert (clipped[4], clipped[5]) == (pytest.approx(0.2), pytest.approx(-0.2))


def test_unknown_mode():
    with pytest.raises(ValueError):
        grpo_group(scored_tree(), "bogus")  # type: ignore[arg-type]


def test_empty_tree_gives_empty_group():
    tree = Tree("p", "q", "1", [])
    assert trajectories(tree) == [] and grpo_group(tree) == [] and grpo_group(tree, "tree") == []
    assert not math.isnan(sum(zscore([1.0])))


# --- teacher paths: "guided" (the default) against "group" (phase 2's rule) -------------------------------------
def answer(
    tree: Tree, start: Node, texts: list[str], source: str, correct: bool, dense: float = -0.02
) -> Node:
    """An answer's lines below `start`, written by `source`, judged and backed up (reward = correctness + dense)."""
    node = start
    for text in texts:
        node = tree.add_child(node, text, source, "student" if source == "student" else "right")
    node.terminal, node.correct, node.reward = True, correct, (1.0 if correct else 0.0) + dense
    node.answer = texts[-1][5:]
    backprop(tree.path(node), node.reward)
    return node


def rescued_tree() -> Tree:
    """What nearly every tree of the H200 run looked like: the student's answers all wrong, a fork in one of them
    continued wrongly by the student and rightly by the teacher, and the teacher's gold answer from the question.
        root -> s1 -> s2 -> "#### 5"             student, wrong
                   -> "#### 6"                     student continuation of s1, wrong
                   -> r1 -> "#### 7"               teacher ("ref") continuation of s1, right
             -> u1 -> "#### 4"                     student, wrong
             -> g1 -> g2 -> "#### 7"               teacher gold answer, right"""
    tree = Tree("p-2", "q?", "7", [{"role": "user", "content": "q?"}])
    s1 = tree.add_child(tree.root, "S1", "student", "student")
    answer(tree, s1, ["S2", "#### 5"], "student", False, dense=-0.01)
    answer(tree, s1, ["#### 6"], "student", False, dense=-0.03)
    answer(tree, s1, ["R1", "#### 7"], "ref", True)
    answer(tree, tree.root, ["U1", "#### 4"], "student", False, dense=-0.02)
    answer(tree, tree.root, ["G1", "G2", "#### 7"], "ref", True)
    return tree


def test_a_rescued_group_trains_the_teachers_text_and_pushes_no_student_answer_down():
    tree = rescued_tree()
    paths = trajectories(tree)
    assert rescued(paths) and not rescued(trajectories(scored_tree()))
    items = grpo_group(tree, teacher_weight=0.5)
    baseline = (-0.01 - 0.03 - 0.02) / 3  # the student's own answers only
    assert [(i.context, i.completion) for i in items] == [
        ("S1\n", "R1\n#### 7"),  # the student's prefix is context, not completion
        ("", "G1\nG2\n#### 7"),  # the gold answer from the question
    ]
    assert [i.advantage for i in items] == pytest.approx([0.98 - baseline, 0.98 - baseline])
    assert [i.weight for i in items] == [0.5, 0.5] and [i.source for i in items] == ["ref", "ref"]
    # no item holds student-written text as its completion
    assert all("S1" not in i.completion and "U1" not in i.completion for i in items)


def test_the_group_rule_of_phase_2_is_kept_as_an_ablation():
    tree = rescued_tree()
    for k in range(4):  # the run's proportions: ~10 answers a tree, ~2 of them right (teacher-written)
        answer(tree, tree.root, [f"V{k}", "#### 3"], "student", False)
    items = grpo_group(tree, teacher_paths="group")
    rewards = [t.reward for t in trajectories(tree)]
    mean = sum(rewards) / len(rewards)
    assert [i.completion for i in items][:5] == [
        "S1\nS2\n#### 5",
        "S1\n#### 6",
        "S1\nR1\n#### 7",  # the student's prefix inside a positive item
        "U1\n#### 4",
        "G1\nG2\n#### 7",
    ]
    assert [i.advantage for i in items] == pytest.approx([r - mean for r in rewards])
    assert sum(i.advantage < 0 for i in items) == 7  # every student answer pushed down
    # the prefix S1's net credit, summed over the items that hold it: up, although all the student wrote is wrong
    assert sum(i.advantage for i in items if i.completion.startswith("S1")) > 0.1
    guided = grpo_group(tree)
    assert [i.completion for i in guided] == ["R1\n#### 7", "G1\nG2\n#### 7"]  # the same tree, guided
    with pytest.raises(ValueError):
        grpo_group(tree, teacher_paths="bogus")  # type: ignore[arg-type]


def test_where_the_student_solved_it_its_answers_keep_dr_grpo_around_its_own_mean():
    tree = Tree("p-3", "q?", "7", [{"role": "user", "content": "q?"}])
    s1 = tree.add_child(tree.root, "S1", "student", "student")
    answer(tree, s1, ["#### 7"], "student", True, dense=0.0)
    answer(tree, s1, ["#### 6"], "student", False, dense=0.0)
    answer(tree, tree.root, ["U1", "#### 5"], "student", False, dense=0.0)
    answer(tree, s1, ["R1", "#### 7"], "ref", True, dense=0.0)
    items = grpo_group(tree)
    own = [i for i in items if i.source == "student"]
    assert [i.completion for i in own] == ["S1\n#### 7", "S1\n#### 6", "U1\n#### 5"]
    assert [i.advantage for i in own] == pytest.approx([2 / 3, -1 / 3, -1 / 3])  # b = 1/3, not the mean of 4
    assert sum(i.advantage for i in own) == pytest.approx(0.0)
    (guided,) = [i for i in items if i.source == "ref"]
    assert (guided.context, guided.completion, guided.advantage) == (
        "S1\n",
        "R1\n#### 7",
        pytest.approx(2 / 3),
    )
    scaled = grpo_group(tree, scale=True)
    std = math.sqrt(sum((r - 0.5) ** 2 for r in (1.0, 0.0, 0.0, 1.0)) / 4)  # the whole group's spread
    assert scaled[0].advantage == pytest.approx((1.0 - 1 / 3) / std, rel=1e-5)


def test_teacher_paths_enter_only_against_the_student_outcome():
    tree = Tree("p-4", "q?", "7", [{"role": "user", "content": "q?"}])
    answer(tree, tree.root, ["A", "#### 7"], "student", True, dense=0.0)
    answer(tree, tree.root, ["B", "#### 7"], "student", True, dense=0.0)
    answer(tree, tree.root, ["R", "#### 7"], "ref", True, dense=0.0)  # right like the student: no signal
    assert grpo_group(tree) == []
    answer(tree, tree.root, ["W", "#### 8"], "ref", False, dense=0.0)  # a "wrong" teacher's answer
    (item,) = grpo_group(tree)
    assert (item.completion, item.advantage) == ("W\n#### 8", pytest.approx(-1.0))
    # a tree of teacher answers only (no student answer): the right ones train with A = R, the wrong ones not
    teacher_only = Tree("p-5", "q?", "7", [{"role": "user", "content": "q?"}])
    answer(teacher_only, teacher_only.root, ["G", "#### 7"], "ref", True, dense=0.0)
    answer(teacher_only, teacher_only.root, ["W", "#### 8"], "ref", False, dense=0.0)
    (gold,) = grpo_group(teacher_only)
    assert (gold.completion, gold.advantage) == ("G\n#### 7", pytest.approx(1.0))


def test_trees_of_student_answers_give_the_same_items_under_both_rules():
    """The grpo and mcts_student arms (no teacher) are untouched by the teacher-path rule."""
    tree = Tree("p-6", "q?", "7", [{"role": "user", "content": "q?"}])
    s1 = tree.add_child(tree.root, "S1", "student", "student")
    answer(tree, s1, ["#### 7"], "student", True)
    answer(tree, s1, ["#### 6"], "student", False, dense=-0.05)
    answer(tree, tree.root, ["#### 5"], "student", False)
    for scale in (False, True):
        guided, group = grpo_group(tree, scale=scale), grpo_group(tree, scale=scale, teacher_paths="group")
        assert [(i.context, i.completion, i.weight) for i in guided] == [
            (i.context, i.completion, i.weight) for i in group
        ]
        assert [i.advantage for i in guided] == pytest.approx([i.advantage for i in group])


def sampled_tree() -> Tree:
    """A student answer from a student server (ids and sampler log-probs on each line, version 3), a fork's
    continuation after its first line (version 4), and a teacher's answer (no ids, no version):
    root -> a "x = 1" (v3, ids 1 2) -> a1 "#### 1" (v3, ids 3 4; reward 1)
                                    -> a2 "#### 2" (v4, ids 5; reward 0)
    root -> t "#### 1" (teacher, reward 1)"""
    tree = Tree("p-0", "q?", "1", [{"role": "user", "content": "q?"}])
    a = tree.add_child(
        tree.root,
        "x = 1",
        "student",
        "student",
        adapter_version=3,
        token_ids=[1, 2],
        sampler_logprobs=[-0.1, -0.2],
    )
    leaves = [
        tree.add_child(
            a,
            "#### 1",
            "student",
            "student",
            adapter_version=3,
            token_ids=[3, 4],
            sampler_logprobs=[-0.3, -0.4],
        ),
        tree.add_child(
            a, "#### 2", "student", "student", adapter_version=4, token_ids=[5], sampler_logprobs=[-0.5]
        ),
        tree.add_child(tree.root, "#### 1", "t1", "right"),
    ]
    for leaf, reward in zip(leaves, (1.0, 0.0, 1.0), strict=True):
        leaf.terminal, leaf.reward, leaf.correct = True, reward, reward > 0
        backprop(tree.path(leaf), reward)
    return tree


def test_items_of_sampled_text_carry_its_tokens_and_the_sampler_log_probs():
    items = grpo_group(sampled_tree(), "flat")
    first, fork, teacher = items
    assert (first.completion_ids, first.sampler_logprobs) == ([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4])
    assert (fork.completion_ids, fork.sampler_logprobs) == ([1, 2, 5], [-0.1, -0.2, -0.5])
    assert [i.adapter_version for i in items] == [3, 3, None]  # the oldest version of the item's student text
    assert teacher.completion_ids is None and teacher.sampler_logprobs is None
    sent = first.to_trainer_item()
    assert sent["completion_ids"] == [1, 2, 3, 4] and sent["sampler_logprobs"] == [-0.1, -0.2, -0.3, -0.4]
    assert (
        "completion_ids" not in teacher.to_trainer_item()
        and "sampler_logprobs" not in teacher.to_trainer_item()
    )
    # tree mode: a segment's own tokens, after the text of the lines before it
    segments = {i.completion: i for i in grpo_group(sampled_tree(), "tree")}
    assert segments["#### 2"].context == "x = 1\n" and segments["#### 2"].completion_ids == [5]
    assert segments["#### 2"].adapter_version == 4 and segments["x = 1"].completion_ids == [1, 2]


def test_a_guided_teacher_item_after_sampled_student_lines_carries_no_sampled_tokens():
    """A rescued tree from a student server: the teacher's right continuation of the student's sampled prefix is
    learned with that prefix as context; its completion is the teacher's, so no ids, no sampler log-probs and no
    version (only the student's text would be stale); the student's wrong answers give no item."""
    tree = Tree("p-1", "q?", "1", [{"role": "user", "content": "q?"}])
    a = tree.add_child(
        tree.root,
        "x = 2",
        "student",
        "student",
        adapter_version=3,
        token_ids=[1, 2],
        sampler_logprobs=[-0.1, -0.2],
    )
    wrong = tree.add_child(
        a, "#### 2", "student", "student", adapter_version=3, token_ids=[3], sampler_logprobs=[-0.3]
    )
    right = tree.add_child(a, "#### 1", "reference", "right")
    for leaf, reward in ((wrong, 0.0), (right, 1.0)):
        leaf.terminal, leaf.reward, leaf.correct = True, reward, reward > 0
        backprop(tree.path(leaf), reward)
    (item,) = grpo_group(tree)
    assert (item.context, item.completion, item.source) == ("x = 2\n", "#### 1", "reference")
    assert item.completion_ids is None and item.sampler_logprobs is None and item.adapter_version is None
    assert "sampler_logprobs" not in item.to_trainer_item()


def test_a_path_with_a_line_without_sampled_tokens_is_scored_on_its_text():
    tree = sampled_tree()
    tree.nodes[1].token_ids = None  # "x = 1" came from a server that gave no ids
    assert all(i.completion_ids is None and i.sampler_logprobs is None for i in grpo_group(tree, "flat"))
