"""From a finished tree to training data: root-to-terminal trajectories and GRPO groups.

Three advantage modes:
- "flat" (GRPO): one item per root-to-terminal trajectory, completion = the whole solution text;
      A_j = clip((R_j - mean(R)) / (std(R) + eps), -clip, clip)
  (population std; all advantages 0 when every trajectory earned the same reward). Before clipping the
  advantages of a group sum to 0.
- "tree" (TreeRL / TreeRPO style): one item per step on any trajectory, completion = that step, context =
  the solution before it; A(step) = clip(V(node) - V(parent), -clip, clip), V = the node's mean backed-up
  value.
- "rejection" (rejection-sampling fine-tuning; STaR, RAFT): one item per distinct correct root-to-terminal
  trajectory with at least one worked line before its answer, advantage 1; wrong ones are dropped, and so are
  bare answers ("#### 72" alone), which teach guessing. With the loss's ratio at 1 this is supervised fine-tuning on
  the correct answers the search found: nothing pushes sampled text down, so a weak student (whose groups are
  nearly all wrong) cannot be driven to collapse by negative advantages.
Off-policy text: an item whose completion contains any teacher-written step gets weight `teacher_weight`
(default 0.5; the trainer scales its loss by it); items made only of student steps get weight 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from orchestrator.search.tree import STUDENT, Node, Tree

EPS = 1e-6


@dataclass
class Trajectory:
    leaf: int
    node_ids: list[int]  # root excluded
    steps: list[str]
    sources: list[str]  # per step: "student" or a teacher name
    kinds: list[str]  # per step: "student" | "right" | "wrong"
    path_code: str
    reward: float
    correct: bool
    answer: str | None

    @property
    def text(self) -> str:
        return "\n".join(self.steps)

    @property
    def on_policy(self) -> bool:
        return all(s == STUDENT for s in self.sources)


@dataclass
class GroupItem:
    messages: list[dict]
    context: str
    completion: str
    advantage: float
    source: str  # "student", a teacher name, or "mixed:<t1>,<t2>" for a path with several sources
    weight: float
    node_id: int | None = None  # the leaf (flat) or the step's node (tree)

    def to_trainer_item(self) -> dict:
        """One item of the trainer's POST /grpo/step."""
        return {
            "messages": self.messages,
            "context": self.context,
            "completion": self.completion,
            "advantage": self.advantage,
            "weight": self.weight,
        }


def trajectories(tree: Tree) -> list[Trajectory]:
    """Every root-to-terminal path whose leaf has been scored, in node order."""
    out = []
    for leaf in tree:
        if not leaf.terminal or leaf.reward is None or leaf.id == 0:
            continue
        steps = tree.steps(leaf)
        out.append(
            Trajectory(
                leaf=leaf.id,
                node_ids=[n.id for n in steps],
                steps=[n.text for n in steps],
                sources=[n.source for n in steps],
                kinds=[n.kind for n in steps],
                path_code=leaf.path_code,
                reward=leaf.reward,
                correct=bool(leaf.correct),
                answer=leaf.answer,
            )
        )
    return out


def zscore(values: list[float], clip: float = 5.0) -> list[float]:
    if not values:
        return []
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std < EPS:
        return [0.0] * len(values)
    return [max(-clip, min(clip, (v - mean) / (std + EPS))) for v in values]


def _source(sources: list[str]) -> str:
    distinct = list(dict.fromkeys(sources))
    return distinct[0] if len(distinct) == 1 else "mixed:" + ",".join(distinct)


def _whole_path_item(tree: Tree, path: Trajectory, advantage: float, teacher_weight: float) -> GroupItem:
    """One item whose completion is a whole root-to-terminal path (the flat and rejection modes)."""
    return GroupItem(
        messages=tree.messages,
        context="",
        completion=path.text,
        advantage=advantage,
        source=_source(path.sources),
        weight=1.0 if path.on_policy else teacher_weight,
        node_id=path.leaf,
    )


def grpo_group(
    tree: Tree,
    mode: Literal["flat", "tree", "rejection"] = "flat",
    clip: float = 5.0,
    teacher_weight: float = 0.5,
) -> list[GroupItem]:
    if mode == "flat":
        paths = trajectories(tree)
        advantages = zscore([t.reward for t in paths], clip)
        return [_whole_path_item(tree, t, a, teacher_weight) for t, a in zip(paths, advantages, strict=True)]
    if mode == "rejection":
        items, seen = [], set()
        for t in trajectories(tree):
            worked = sum(1 for line in t.text.split("\n") if line.strip()) >= 2
            if not t.correct or not worked or t.text in seen:
                continue
            seen.add(t.text)
            items.append(_whole_path_item(tree, t, 1.0, teacher_weight))
        return items
    if mode == "tree":
        items, seen = [], set()
        for t in trajectories(tree):
            for node_id in t.node_ids:
                if node_id in seen:
                    continue
                seen.add(node_id)
                node: Node = tree.nodes[node_id]
                assert node.parent is not None  # trajectories leave the root out
                parent = tree.nodes[node.parent]
                advantage = max(-clip, min(clip, node.value - parent.value))
                items.append(
                    GroupItem(
                        messages=tree.messages,
                        context=tree.partial_text(parent),
                        completion=node.text,
                        advantage=advantage,
                        source=node.source,
                        weight=1.0 if node.source == STUDENT else teacher_weight,
                        node_id=node.id,
                    )
                )
        return items
    raise ValueError(f"unknown advantage mode {mode!r} (flat | tree | rejection)")
