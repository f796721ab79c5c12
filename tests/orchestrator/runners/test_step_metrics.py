import pytest

from orchestrator.runners.step_metrics import tree_metrics
from orchestrator.search.tree import Tree


def test_tree_metrics_over_terminal_paths():
    tree = Tree("train-0", "q", "4", [{"role": "user", "content": "q"}])
    a = tree.add_child(tree.root, "2+2=4", "student", "student", adapter_version=3)
    good = tree.add_child(a, "#### 4", "student", "student", adapter_version=2)
    bad = tree.add_child(tree.root, "#### 5", "embedded-base", "wrong")
    for node, correct, reward in ((good, True, 1.0), (bad, False, -1.0)):
        node.terminal, node.correct, node.reward = True, correct, reward
    metrics = tree_metrics([tree])
    assert metrics["trajectories"] == 2
    assert metrics["mean_reward"] == 0.0
    assert metrics["correct_leaf_share"] == 0.5
    assert metrics["student_correct_share"] == 1.0 and metrics["rescued_groups"] == 0
    assert metrics["sample_versions"] == [2, 3]  # the student's versions; the teacher's node has none
    assert tree_metrics([]) == {
        "trajectories": 0,
        "mean_reward": None,
        "correct_leaf_share": None,
        "student_correct_share": None,
        "rescued_groups": 0,
        "sample_versions": [],
    }


def test_a_tree_only_a_teacher_got_right_is_counted_as_rescued():
    tree = Tree("train-1", "q", "4", [{"role": "user", "content": "q"}])
    a = tree.add_child(tree.root, "2+3=5", "student", "student")
    wrong = [
        tree.add_child(a, "#### 5", "student", "student"),
        tree.add_child(tree.root, "#### 6", "student", "student"),
    ]
    right = tree.add_child(a, "#### 4", "reference", "right")  # the teacher finished the student's prefix
    for node in wrong:
        node.terminal, node.correct, node.reward = True, False, 0.0
    right.terminal, right.correct, right.reward = True, True, 1.0
    metrics = tree_metrics([tree, tree])
    assert metrics["rescued_groups"] == 2 and metrics["student_correct_share"] == 0.0
    assert metrics["correct_leaf_share"] == pytest.approx(1 / 3)
