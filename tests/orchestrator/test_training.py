from orchestrator.training import checkpoint_name, plan_batches, tree_metrics
from orchestrator.tree import Tree


def test_plan_batches_covers_every_epoch_in_order():
    assert plan_batches(5, 2, 1) == [[0, 1], [2, 3], [4]]
    assert plan_batches(3, 2, 2) == [[0, 1], [2, 0], [1, 2]]
    assert plan_batches(1, 4, 1) == [[0]]


def test_checkpoint_names_are_valid_trainer_names():
    import re

    name = checkpoint_name("train-0123456789ab", 12)
    assert name == "train-0123456789ab-step000012"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name)


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

