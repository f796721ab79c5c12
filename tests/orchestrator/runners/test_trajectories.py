import math

import pytest

from orchestrator.runners.trajectories import grpo_group, trajectories, zscore
from orchestrator.search.tree import Tree, backprop


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
