"""Pictures of jobs: training curves (PNG), the eval report (PNG + HTML), a search tree (SVG, no graphviz).

matplotlib runs with the Agg backend (no display). The tree picture is plain SVG written here: a tidy layered
layout (leaves spaced evenly, each parent centred over its children), one box per node coloured by source, an
outline by outcome, and the step text as a tooltip.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


# --- training curves ---------------------------------------------------------------------------------------
def train_curves_png(steps: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Four panels over the step number: mean reward, share of correct leaves, KL, eval accuracy."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    x = [s["step"] for s in steps]
    panels = [
        (axes[0, 0], "mean_reward", "mean leaf reward"),
        (axes[0, 1], "correct_leaf_share", "share of correct leaves"),
        (axes[1, 0], "kl", "KL to the base model"),
    ]
    for ax, key, label in panels:
        pts = [(xi, s[key]) for xi, s in zip(x, steps, strict=True) if s.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 1].set_ylim(-0.02, 1.02)
    ax = axes[1, 1]
    for key, label in (("eval_strict_acc", "strict"), ("eval_flexible_acc", "flexible")):
        pts = [(xi, s[key]) for xi, s in zip(x, steps, strict=True) if s.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="s", ms=4, label=label)
    if ax.lines:
        ax.legend()
    else:
        ax.text(
            0.5,
            0.5,
            "no eval during training\n(eval_every not set)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("student eval accuracy")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- eval report -------------------------------------------------------------------------------------------
def eval_report_png(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: strict and flexible accuracy per model, with the McNemar p-values in the title."""
    models = list(report["models"])
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    width = 0.38
    for i, kind in enumerate(("strict", "flexible")):
        values = [report["models"][m][f"{kind}_acc"] for m in models]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(models))], values, width, label=kind)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend()
    title = f"GSM8K, n={report['n']}"
    if "comparison" in report:
        c = report["comparison"]
        title += f"   McNemar p: strict {c['strict']['p_value']:.3f}, flexible {c['flexible']['p_value']:.3f}"
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def eval_report_html(report: dict[str, Any], rows: list[dict[str, Any]], png_name: str | None = None) -> str:
    esc = html.escape
    head = "".join(
        f"<tr><td>{esc(m)}</td><td>{v['strict_acc']:.1%} ({v['strict_correct']}/{v['n']})</td>"
        f"<td>{v['flexible_acc']:.1%} ({v['flexible_correct']}/{v['n']})</td></tr>"
        for m, v in report["models"].items()
    )
    comparison = ""
    if "comparison" in report:
        c = report["comparison"]
        comparison = "".join(
            f"<p>{kind}: base only {c[kind]['only_base']}, student only {c[kind]['only_student']}, "
            f"McNemar exact p = {c[kind]['p_value']:.4f}</p>"
            for kind in ("strict", "flexible")
        )
    body = "".join(
        f"<tr><td>{esc(r['problem_id'])}</td><td>{esc(r['model'])}</td><td>{esc(str(r['gold']))}</td>"
        f"<td>{esc(str(r['strict_pred']))}</td><td>{'✓' if r['strict_correct'] else '✗'}</td>"
        f"<td>{esc(str(r['flexible_pred']))}</td><td>{'✓' if r['flexible_correct'] else '✗'}</td>"
        f"<td><details><summary>answer</summary><pre>{esc(r['output'])}</pre></details></td></tr>"
        for r in rows
    )
    img = f'<img src="{esc(png_name)}" alt="accuracy">' if png_name else ""
    return (
        "<!doctype html><meta charset='utf-8'><title>GSM8K eval</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:2px 6px}"
        "table{border-collapse:collapse}pre{white-space:pre-wrap;max-width:60em}</style>"
        f"<h1>GSM8K eval (n={report['n']})</h1>{img}"
        f"<table><tr><th>model</th><th>strict</th><th>flexible</th></tr>{head}</table>{comparison}"
        "<h2>Per problem</h2><table><tr><th>problem</th><th>model</th><th>gold</th><th>strict</th><th></th>"
        f"<th>flexible</th><th></th><th>output</th></tr>{body}</table>"
    )


# --- search tree -------------------------------------------------------------------------------------------
SOURCE_COLOURS = {"root": "#dddddd", "student": "#9ecae1"}
TEACHER_COLOURS = ["#fdae6b", "#a1d99b", "#bcbddc", "#fdd0a2", "#c7e9c0", "#dadaeb"]


def tree_nodes(tree: dict[str, Any]) -> tuple[dict[str, dict], dict[str, list[str]], str]:
    """Nodes by id, children by id and the root id, from either a flat {"nodes": [...]} list with parent ids
    or a nested {"root": {..., "children": [...]}} / {..., "children": [...]} structure."""
    nodes: dict[str, dict] = {}
    children: dict[str, list[str]] = {}
    if isinstance(tree.get("nodes"), list):
        for i, node in enumerate(tree["nodes"]):
            nid = str(node.get("id", i))
            nodes[nid] = node
            children.setdefault(nid, [])
        root = None
        for nid, node in nodes.items():
            parent = node.get("parent", node.get("parent_id"))
            if parent is None:
                root = root or nid
            else:
                children.setdefault(str(parent), []).append(nid)
        if root is None:
            raise ValueError("tree has no root (a node without a parent)")
        for nid, node in nodes.items():  # an explicit child order wins over list order
            if isinstance(node.get("children"), list) and all(
                not isinstance(c, dict) for c in node["children"]
            ):
                children[nid] = [str(c) for c in node["children"]]
        return nodes, children, root

    def walk(node: dict, path: str) -> str:
        nid = str(node.get("id", path))
        nodes[nid] = node
        children[nid] = [walk(c, f"{path}.{i}") for i, c in enumerate(node.get("children") or [])]
        return nid

    return nodes, children, walk(tree.get("root", tree), "0")


def _colour(source: str | None, palette: dict[str, str]) -> str:
    source = source or "root"
    if source not in palette:
        palette[source] = TEACHER_COLOURS[(len(palette) - len(SOURCE_COLOURS)) % len(TEACHER_COLOURS)]
    return palette[source]


def tree_svg(tree: dict[str, Any], max_label: int = 18) -> str:
    """An SVG picture of a search tree: boxes per node (fill = source, outline = correct/wrong terminal),
    labels with visits and value, the step text as a <title> tooltip."""
    nodes, children, root = tree_nodes(tree)
    box_w, box_h, gap_x, gap_y = 120, 40, 14, 46
    x_of: dict[str, float] = {}
    depth_of: dict[str, int] = {}
    next_leaf = 0.0

    def layout(nid: str, depth: int) -> float:  # post-order: leaves left to right, parents centred
        nonlocal next_leaf
        depth_of[nid] = depth
        kids = children.get(nid, [])
        if not kids:
            x_of[nid] = next_leaf
            next_leaf += 1
        else:
            xs = [layout(k, depth + 1) for k in kids]
            x_of[nid] = (xs[0] + xs[-1]) / 2
        return x_of[nid]

    layout(root, 0)
    width = int(max(1.0, next_leaf) * (box_w + gap_x) + gap_x)
    height = int((max(depth_of.values()) + 1) * (box_h + gap_y) + gap_y)
    px = {n: gap_x + x_of[n] * (box_w + gap_x) for n in nodes}
    py = {n: gap_y / 2 + depth_of[n] * (box_h + gap_y) for n in nodes}
    palette = dict(SOURCE_COLOURS)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 24}" '
        f'font-family="sans-serif" font-size="10">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for parent, kids in children.items():
        for kid in kids:
            parts.append(
                f'<line x1="{px[parent] + box_w / 2:.1f}" y1="{py[parent] + box_h:.1f}" '
                f'x2="{px[kid] + box_w / 2:.1f}" y2="{py[kid]:.1f}" stroke="#888"/>'
            )
    for nid, node in nodes.items():
        text = str(node.get("text") or (tree.get("question") or "question" if nid == root else ""))
        label = "question" if nid == root else text.strip().replace("\n", " ")
        label = label if len(label) <= max_label else label[: max_label - 1] + "…"
        visits = node.get("visits", node.get("n"))
        value = node.get("value", node.get("q", node.get("mean_value")))
        if value is None and node.get("value_sum") is not None and visits:
            value = node["value_sum"] / visits
        correct = node.get("correct")
        stroke = "#2ca02c" if correct is True else "#d62728" if correct is False else "#555"
        stroke_w = 3 if node.get("terminal") or correct is not None else 1
        stats = f"n={visits}" if visits is not None else ""
        if value is not None:
            stats += f" v={float(value):.2f}"
        if node.get("reward") is not None:
            stats += f" r={float(node['reward']):.2f}"
        tooltip = f"{node.get('source') or 'root'}: {text}"
        parts.append(
            f"<g><title>{html.escape(tooltip)}</title>"
            f'<rect x="{px[nid]:.1f}" y="{py[nid]:.1f}" width="{box_w}" height="{box_h}" rx="5" '
            f'fill="{_colour(node.get("source"), palette)}" stroke="{stroke}" stroke-width="{stroke_w}"/>'
            f'<text x="{px[nid] + 4:.1f}" y="{py[nid] + 15:.1f}">{html.escape(label)}</text>'
            f'<text x="{px[nid] + 4:.1f}" y="{py[nid] + 31:.1f}" fill="#333">{html.escape(stats)}</text></g>'
        )
    legend_x = gap_x
    for source, colour in palette.items():
        parts.append(
            f'<rect x="{legend_x}" y="{height + 6}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{height + 15}">{html.escape(source)}</text>'
        )
        legend_x += 20 + 7 * len(source)
    parts.append("</svg>")
    return "\n".join(parts)
