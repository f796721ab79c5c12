"""From a finished tree to training data: root-to-terminal trajectories and GRPO groups.

A tree is one group. A group that carries no correctness signal is dropped (DAPO's dynamic sampling, verl's
filter_groups): its reward differences would be the dense tie-breaks alone, and training on them is what collapsed
the early GPU runs.

Three advantage modes:
- "flat" (GRPO, the default): one item per root-to-terminal trajectory, A = R - b, clipped (Dr. GRPO: no std
  scaling; `scale=True` divides by the std of the group's rewards, GRPO's z-score). How teacher-written text
  enters is `teacher_paths`:
  - "guided" (the default since the H200 run of session 4; docs/learning-design.md, "What the H200 run showed"):
        b = mean R over the student's own answers (0 when it wrote none)
    the baseline estimates the student's value at the question, which only its own samples measure; a teacher's
    answer neither raises nor lowers it.
        student answers (every line student-written): items only when they are both right and wrong;
            A_j = R_j - b   (their advantages sum to 0)
        a path with teacher-written text: an item when it carries a signal against the student (the student's
            answers are mixed, or the path's correctness differs from theirs; with no student answer: when it is
            right); its completion is the text from its first teacher-written line to its end, and the student's
            lines before that are its context (no gradient): A = R - b, weight `teacher_weight`.
    So in a "rescued" group, where only teacher-written answers are right, the student's wrong answers get no
    push down (nothing of its own is right to contrast them with) and the teacher's right text is learned as a
    guided continuation of the student's own prefix, or from the question for a whole (gold) answer: supervised
    fine-tuning on it. A student prefix gets credit only from the student's own answers through it, never from
    a teacher that finished it.
  - "group" (phase 2's rule, kept as an ablation): every path is a member of the group,
        A_j = R_j - mean(R)   over all paths;  completion = the whole path, student prefix included.
  A prefix shared by several paths appears in each of their items, so it gets the sum of their advantages: the
  subtree's credit (TreeRL).
- "tree" (TreeRL): one item per segment of the scored subtree (a maximal chain of nodes that do not branch:
  in the fork search a run of lines up to where answers part, or a whole continuation), completion = the
  segment's lines, context = the solution before it;
      A(segment) = clip((V(end) - V(parent)) + (V(end) - V(root)), -clip, clip)
  V = a node's mean backed-up value, `end` the segment's last node, `parent` the node before its first:
  TreeRL's local plus global advantage (the local term of a chain telescopes, so segments lose nothing).
  Groups whose answers are all right or all wrong are dropped.
- "rejection" (rejection-sampling fine-tuning; STaR, RAFT): one item per distinct correct root-to-terminal
  trajectory with at least one worked line before its answer, advantage 1; wrong ones are dropped, and so are
  bare answers ("#### 72" alone), which teach guessing. With the loss's ratio at 1 this is supervised fine-tuning on
  the correct answers the search found: nothing pushes sampled text down, so a weak student (whose groups are
  nearly all wrong) cannot be driven to collapse by negative advantages.
Off-policy text: an item whose completion contains any teacher-written step gets weight `teacher_weight`
(the request's, 1.0 by default: the trainer scales its loss by it); items made only of student steps get weight 1.

Samples from a student server (STUDENT_URL): an item made only of student steps that all kept their sampled
tokens carries them (`completion_ids`, the steps' tokens one after another, scored instead of the text) and the
log-probs the server gave them (`sampler_logprobs`, the behaviour policy): the trainer weights each token by
min(pi_old / mu, loss.is_cap) (truncated importance sampling). Every item says the oldest adapter version its
student text came from (`adapter_version`), for the staleness limit (off_policy.py). Where a continuation follows
a fork point, the server was given the tree's text of the lines before it (stripped, blank lines dropped) while the
item carries those lines' own sampled tokens: the two differ only where the sample had blank lines or spaces
around a line, and the importance weight takes that difference as part of the mismatch it corrects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    adapter_version: int | None = (
        None  # the oldest student adapter version of its text (None: no student text)
    )
    completion_ids: list[int] | None = None  # the sampled tokens of the completion (a student server's only)
    sampler_logprobs: list[float] | None = None  # their log-probs as that server reported them

    def to_trainer_item(self) -> dict:
        """One item of the trainer's POST /grpo/step."""
        item = {
            "messages": self.messages,
            "context": self.context,
            "completion": self.completion,
            "advantage": self.advantage,
            "weight": self.weight,
        }
        if self.completion_ids is not None and self.sampler_logprobs is not None:
            item.update(completion_ids=self.completion_ids, sampler_logprobs=self.sampler_logprobs)
        return item


def oldest_version(nodes: Sequence[Node]) -> int | None:
    """The oldest adapter version that wrote any of `nodes` (None when none says)."""
    versions = [n.adapter_version for n in nodes if n.adapter_version is not None]
    return min(versions) if versions else None


def sampled_tokens(nodes: Sequence[Node]) -> tuple[list[int], list[float]] | None:
    """The nodes' sampled token ids and their sampler log-probs, one node after another; None unless every node is
    the student's and kept its tokens (a teacher's text, or a sample from a server that gave no ids, is scored on
    its text instead)."""
    ids: list[int] = []
    logprobs: list[float] = []
    for node in nodes:
        if node.source != STUDENT or node.token_ids is None or node.sampler_logprobs is None:
            return None
        if len(node.token_ids) != len(node.sampler_logprobs):
            return None
        ids += node.token_ids
        logprobs += node.sampler_logprobs
    return (ids, logprobs) if ids else None


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


def _std(values: list[float]) -> float:
    """The population standard deviation (GRPO's group std)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def zscore(values: list[float], clip: float = 5.0) -> list[float]:
    if not values:
        return []
    mean = sum(values) / len(values)
    std = _std(values)
    if std < EPS:
        return [0.0] * len(values)
    return [max(-clip, min(clip, (v - mean) / (std + EPS))) for v in values]


def _source(sources: list[str]) -> str:
    distinct = list(dict.fromkeys(sources))
    return distinct[0] if len(distinct) == 1 else "mixed:" + ",".join(distinct)


def _whole_path_item(tree: Tree, path: Trajectory, advantage: float, teacher_weight: float) -> GroupItem:
    """One item whose completion is a whole root-to-terminal path (the flat and rejection modes)."""
    nodes = [tree.nodes[i] for i in path.node_ids]
    sampled = sampled_tokens(nodes)
    return GroupItem(
        messages=tree.messages,
        context="",
        completion=path.text,
        advantage=advantage,
        source=_source(path.sources),
        weight=1.0 if path.on_policy else teacher_weight,
        node_id=path.leaf,
        adapter_version=oldest_version(nodes),
        completion_ids=sampled[0] if sampled else None,
        sampler_logprobs=sampled[1] if sampled else None,
    )


def rescued(paths: list[Trajectory]) -> bool:
    """True when the student wrote answers, none of them right, and a path with teacher-written text is right."""
    own = [t for t in paths if t.on_policy]
    return bool(own) and not any(t.correct for t in own) and any(t.correct for t in paths if not t.on_policy)


def mixed_correctness(paths: list[Trajectory]) -> bool:
    """True when the paths hold both correct and wrong answers: the group carries a correctness signal."""
    return len({t.correct for t in paths}) == 2


def centred(values: list[float], clip: float = 5.0) -> list[float]:
    """R - mean(R), clipped (Dr. GRPO's group advantage: no std scaling)."""
    if not values:
        return []
    mean = sum(values) / len(values)
    return [max(-clip, min(clip, v - mean)) for v in values]


def _guided_item(tree: Tree, path: Trajectory, advantage: float, teacher_weight: float) -> GroupItem:
    """A path with teacher-written text: completion from its first teacher-written line, the student's lines
    before it as context. Its completion is teacher-written, so it carries no sampled tokens; its version is that
    of any student line inside the completion (the context gets no gradient)."""
    first = next(i for i, src in enumerate(path.sources) if src != STUDENT)
    start = tree.nodes[path.node_ids[first]]
    assert start.parent is not None
    return GroupItem(
        messages=tree.messages,
        context=tree.partial_text(tree.nodes[start.parent]),
        completion="\n".join(path.steps[first:]),
        advantage=advantage,
        source=_source(path.sources[first:]),
        weight=teacher_weight,
        node_id=path.leaf,
        adapter_version=oldest_version([tree.nodes[i] for i in path.node_ids[first:]]),
    )


def guided_group(
    paths: list[Trajectory], tree: Tree, clip: float, teacher_weight: float, scale: bool
) -> list[GroupItem]:
    """The flat group with teacher_paths="guided" (the module docstring has the rule)."""
    own = [t for t in paths if t.on_policy]
    baseline = sum(t.reward for t in own) / len(own) if own else 0.0
    own_signal = mixed_correctness(own)
    student_outcome = {t.correct for t in own} or {False}  # no answer of its own: as if it could not solve it
    guided = [t for t in paths if not t.on_policy and (own_signal or t.correct not in student_outcome)]
    if not own_signal and not guided:
        return []
    spread = _std([t.reward for t in paths]) + EPS if scale else 1.0

    def advantage(t: Trajectory) -> float:
        return max(-clip, min(clip, (t.reward - baseline) / spread))

    items = [_whole_path_item(tree, t, advantage(t), teacher_weight) for t in own] if own_signal else []
    return items + [_guided_item(tree, t, advantage(t), teacher_weight) for t in guided]


def segments(tree: Tree, paths: list[Trajectory]) -> list[list[Node]]:
    """The scored subtree (the nodes on `paths`) cut into maximal chains of nodes that do not branch, in node
    order: a chain starts below the root or below a node with two or more scored children."""
    kept = {i for t in paths for i in t.node_ids}
    kept_children = {i: [c for c in tree.nodes[i].children if c in kept] for i in kept}
    out = []
    for i in sorted(kept):
        node = tree.nodes[i]
        assert node.parent is not None  # trajectories leave the root out
        if node.parent != 0 and len(kept_children[node.parent]) == 1:
            continue  # it continues its parent's chain
        chain = [node]
        while len(kept_children[chain[-1].id]) == 1:
            chain.append(tree.nodes[kept_children[chain[-1].id][0]])
        out.append(chain)
    return out


def grpo_group(
    tree: Tree,
    mode: Literal["flat", "tree", "rejection"] = "flat",
    clip: float = 5.0,
    teacher_weight: float = 1.0,
    scale: bool = False,
    teacher_paths: Literal["guided", "group"] = "guided",
) -> list[GroupItem]:
    """The tree's GRPO items; none when the group is dropped (it carries no correctness signal)."""
    if mode not in ("flat", "tree", "rejection"):
        raise ValueError(f"unknown advantage mode {mode!r} (flat | tree | rejection)")
    if teacher_paths not in ("guided", "group"):
        raise ValueError(f"unknown teacher_paths {teacher_paths!r} (guided | group)")
    paths = trajectories(tree)
    if mode == "rejection":
        items, seen = [], set()
        for t in paths:
            worked = sum(1 for line in t.text.split("\n") if line.strip()) >= 2
            if not t.correct or not worked or t.text in seen:
                continue
            seen.add(t.text)
            items.append(_whole_path_item(tree, t, 1.0, teacher_weight))
        return items
    if mode == "flat" and teacher_paths == "guided":
        return guided_group(paths, tree, clip, teacher_weight, scale)
    if not mixed_correctness(paths):
        return []
    if mode == "flat":
        rewards = [t.reward for t in paths]
        advantages = zscore(rewards, clip) if scale else centred(rewards, clip)
        return [_whole_path_item(tree, t, a, teacher_weight) for t, a in zip(paths, advantages, strict=True)]
    items = []
    root_value = tree.root.value
    for chain in segments(tree, paths):
        first, end = chain[0], chain[-1]
        assert first.parent is not None
        parent = tree.nodes[first.parent]
        advantage = (end.value - parent.value) + (end.value - root_value)
        sources = [n.source for n in chain]
        sampled = sampled_tokens(chain)
        items.append(
            GroupItem(
                messages=tree.messages,
                context=tree.partial_text(parent),
                completion="\n".join(n.text for n in chain),
                advantage=max(-clip, min(clip, advantage)),
                source=_source(sources),
                weight=1.0 if all(src == STUDENT for src in sources) else teacher_weight,
                node_id=end.id,
                adapter_version=oldest_version(chain),
                completion_ids=sampled[0] if sampled else None,
                sampler_logprobs=sampled[1] if sampled else None,
            )
        )
    return items
