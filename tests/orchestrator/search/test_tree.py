import math

import pytest

from orchestrator.search.tree import (
    Tree,
    apply_virtual_loss,
    backprop,
    best_child,
    jaccard,
    puct_score,
    q_value,
    remove_virtual_loss,
    softmax,
    uct_score,
)


def small_tree() -> tuple[Tree, list]:
    tree = Tree("p-0", "q?", "42", [{"role": "user", "content": "q?"}])
    a = tree.add_child(tree.root, "Step A", "student", "student", prior=0.6, tokens=3)
    b = tree.add_child(tree.root, "Step B", "t1", "right", prior=0.3, tokens=2)
    c = tree.add_child(tree.root, "Step C", "t1", "wrong", prior=0.1, tokens=4)
    return tree, [a, b, c]


def test_structure_and_text():
    tree, (a, b, c) = small_tree()
    d = tree.add_child(b, "#### 42", "student", "student", tokens=5)
    assert [n.id for n in tree.path(d)] == [0, b.id, d.id]
    assert tree.partial_text(d) == "Step B\n#### 42\n"
    assert tree.partial_text(tree.root) == ""
    assert (d.depth, d.path_tokens) == (2, 7)
    assert (a.path_code, b.path_code, c.path_code, d.path_code) == ("s", "1", "0", "1s")
    assert (b.direction, c.direction, a.direction) == (1, 0, None)


def test_puct_hand_computed():
    tree, (a, b, c) = small_tree()
    tree.root.visits = 4
    a.visits, a.value_sum = 2, 1.0  # Q = 0.5
    b.visits, b.value_sum = 1, 0.8  # Q = 0.8
    # Q + c * P * sqrt(N_parent) / (1 + N)
    assert puct_score(a, tree.root, 1.5) == pytest.approx(0.5 + 1.5 * 0.6 * 2 / 3)  # 1.1
    assert puct_score(b, tree.root, 1.5) == pytest.approx(0.8 + 1.5 * 0.3 * 2 / 2)  # 1.25
    assert puct_score(c, tree.root, 1.5) == pytest.approx(0.0 + 1.5 * 0.1 * 2 / 1)  # 0.3 (fpu 0)
    assert puct_score(c, tree.root, 1.5, fpu=0.2) == pytest.approx(0.2 + 0.3)
    assert best_child(tree, tree.root, "puct", 1.5) is b


def test_puct_unvisited_parent_uses_prior():
    tree, (a, _b, _c) = small_tree()
    assert puct_score(a, tree.root, 1.0) == pytest.approx(0.6)  # sqrt(max(1, 0)) = 1
    assert best_child(tree, tree.root, "puct", 1.0) is a


def test_uct_hand_computed():
    tree, (a, b, c) = small_tree()
    tree.root.visits = 4
    a.visits, a.value_sum = 2, 1.0
    b.visits, b.value_sum = 1, 0.8
    assert uct_score(a, tree.root, 1.414) == pytest.approx(0.5 + 1.414 * math.sqrt(math.log(4) / 2))  # 1.6772
    assert uct_score(b, tree.root, 1.414) == pytest.approx(0.8 + 1.414 * math.sqrt(math.log(4) / 1))  # 2.4648
    assert uct_score(c, tree.root, 1.414) == math.inf
    assert best_child(tree, tree.root, "uct", 1.414) is c


def test_virtual_loss_applied_and_removed():
    tree, (_a, b, c) = small_tree()
    tree.root.visits = 4
    b.visits, b.value_sum = 1, 0.8
    path = [tree.root, b]
    before = puct_score(b, tree.root, 1.5)
    apply_virtual_loss(path)
    assert (tree.root.virtual_loss, b.virtual_loss) == (1, 1)
    # n = 1 + 1, w = 0.8 - 1 * 1.0  -> Q = -0.1; parent n = 5
    assert q_value(b) == pytest.approx(-0.1)
    assert puct_score(b, tree.root, 1.5) == pytest.approx(-0.1 + 1.5 * 0.3 * math.sqrt(5) / 3)
    assert q_value(c) == 0.0  # untouched sibling
    remove_virtual_loss(path)
    assert (tree.root.virtual_loss, b.virtual_loss) == (0, 0)
    assert puct_score(b, tree.root, 1.5) == pytest.approx(before)
    with pytest.raises(RuntimeError):
        remove_virtual_loss(path)


def test_virtual_loss_spreads_selection():
    tree, (a, _b, _c) = small_tree()
    first = best_child(tree, tree.root, "puct", 1.5)
    apply_virtual_loss([tree.root, first])
    second = best_child(tree, tree.root, "puct", 1.5)
    assert first is a and second is not a


def test_backprop_hand_computed():
    tree, (a, b, c) = small_tree()
    d = tree.add_child(b, "#### 42", "student", "student")
    backprop(tree.path(d), 1.0)
    backprop(tree.path(a), 0.25)
    assert (tree.root.visits, tree.root.value_sum) == (2, 1.25)
    assert tree.root.value == pytest.approx(0.625)
    assert (b.visits, b.value, d.visits, d.value) == (1, 1.0, 1, 1.0)
    assert (a.visits, a.value, c.visits, c.value) == (1, 0.25, 0, 0.0)


def test_softmax_and_jaccard():
    assert softmax([0.0, 0.0]) == [0.5, 0.5]
    p = softmax([math.log(1), math.log(3)])
    assert p == pytest.approx([0.25, 0.75])
    assert softmax([-1.0, -2.0], temperature=0.5) == pytest.approx(softmax([-2.0, -4.0]))
    assert softmax([]) == []
    assert jaccard("a b c", "b c d") == pytest.approx(2 / 4)
    assert jaccard("A b", "a B") == 1.0
    assert jaccard("", "") == 1.0 and jaccard("x", "") == 0.0


def test_to_json_has_every_field():
    tree, (_a, b, _c) = small_tree()
    backprop(tree.path(b), 0.5)
    data = tree.to_json()
    assert data["gold"] == "42" and data["root"] == 0 and len(data["nodes"]) == 4
    node = data["nodes"][b.id]
    for key in (
        "text",
        "path_code",
        "source",
        "visits",
        "value_sum",
        "value",
        "prior",
        "step_pre",
        "accumulated_pre",
        "terminal",
        "reward",
        "children",
        "parent",
        "similarity",
        "virtual_loss",
    ):
        assert key in node
    assert node["value"] == 0.5 and data["nodes"][0]["children"] == [1, 2, 3]
    import json

    json.dumps(data)  # serialisable as is
