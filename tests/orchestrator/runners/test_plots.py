from orchestrator.runners.plots import (
    eval_report_html,
    eval_report_png,
    train_curves_png,
    tree_nodes,
    tree_svg,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_train_curves_png(tmp_path):
    steps = [
        {"step": 1, "mean_reward": 0.2, "correct_leaf_share": 0.5, "kl": 0.0},
        {
            "step": 2,
            "mean_reward": 0.4,
            "correct_leaf_share": 0.6,
            "kl": 0.01,
            "eval_strict_acc": 0.3,
            "eval_flexible_acc": 0.4,
        },
        {"step": 3, "skipped": True, "kl": None},
    ]
    path = train_curves_png(steps, tmp_path / "curves.png", "job")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_eval_report_png_and_html(tmp_path):
    report = {
        "n": 2,
        "models": {
            m: {"n": 2, "strict_acc": 0.5, "flexible_acc": 1.0, "strict_correct": 1, "flexible_correct": 2}
            for m in ("base", "student")
        },
        "comparison": {
            k: {"p_value": 1.0, "only_base": 0, "only_student": 0} for k in ("strict", "flexible")
        },
    }
    rows = [
        {
            "problem_id": "test-0",
            "model": "base",
            "gold": "3",
            "strict_pred": "3",
            "strict_correct": True,
            "flexible_pred": "3",
            "flexible_correct": True,
            "output": "<b>#### 3</b>",
        }
    ]
    assert eval_report_png(report, tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    page = eval_report_html(report, rows, "r.png")
    assert "&lt;b&gt;#### 3&lt;/b&gt;" in page  # model output is escaped
    assert "McNemar" in page


def _flat_tree():
    return {
        "root": 0,
        "nodes": [
            {
                "id": 0,
                "parent": None,
                "text": "",
                "source": "root",
                "visits": 3,
                "value": 0.5,
                "children": [1, 2],
            },
            {
                "id": 1,
                "parent": 0,
                "text": "Step 1: 2+2=4",
                "source": "student",
                "visits": 2,
                "value": 1.0,
                "children": [3],
            },
            {
                "id": 2,
                "parent": 0,
                "text": "Step 1 <wrong>",
                "source": "embedded-base",
                "visits": 1,
                "value": 0.0,
                "terminal": True,
                "correct": False,
                "reward": -1.0,
                "children": [],
            },
            {
                "id": 3,
                "parent": 1,
                "text": "#### 4",
                "source": "student",
                "visits": 1,
                "value": 1.0,
                "terminal": True,
                "correct": True,
                "reward": 1.0,
                "children": [],
            },
        ],
    }


def test_tree_nodes_reads_flat_and_nested_trees():
    nodes, children, root = tree_nodes(_flat_tree())
    assert root == "0" and children["0"] == ["1", "2"] and children["1"] == ["3"]
    nested = {"text": "q", "children": [{"text": "a", "children": [{"text": "b"}]}, {"text": "c"}]}
    nodes, children, root = tree_nodes(nested)
    assert len(nodes) == 4 and len(children[root]) == 2


def test_tree_svg_draws_every_node_and_edge():
    svg = tree_svg(_flat_tree())
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<rect x=") >= 4 and svg.count("<line") == 3
    assert "&lt;wrong&gt;" in svg  # step text is escaped
    assert "#2ca02c" in svg and "#d62728" in svg  # correct and wrong terminals are outlined
