from orchestrator.runners.step_metrics import tree_metrics
from orchestrator.search.tree import Tree


def test_tree_metrics_over_terminal_paths():
    tree = Tree("train-0", "q", "4", [{"role": "user", "content": "q"}])
    a = tree.add_child(tree.root, "2+2=4", "student", "student")
    good = tree.add_child(a, "#### 4", "student", "student")
    bad = tree.add_child(tree.root, "#### 5", "embedded-base", "wrong")
    for node, correct, reward in ((good, True, 1.0), (bad, False, -1.0)):
        node.terminal, node.correct, node.reward = True, correct, reward
    metrics = tree_metrics([tree])
    assert metrics["trajectories"] == 2
    assert metrics["mean_reward"] == 0.0
    assert metrics["correct_leaf_share"] == 0.5
    assert tree_metrics([]) == {"trajectories": 0, "mean_reward": None, "correct_leaf_share": None}
