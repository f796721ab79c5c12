"""The fork search's tree operations, pure (no I/O): answers merged into the tree as lines, PUCT selection of
the lines to fork at, and the backup of an answer's reward. fork.py drives them.

Merging. An answer (root..leaf lines) joins the tree line by line: where a node already has a child with the
same line, the answer goes on from that child, so answers that share a prefix share its nodes. The last line
of an answer is a leaf and merges only with a leaf (two identical answers are one leaf, backed up twice); an
intermediate line merges only with an intermediate node. So leaves never get children, and every internal
node is a place an answer went on from.

Selection (AlphaZero's PUCT over the internal line-nodes; the root's expansion is round 0): candidates are the
internal nodes below the root with room left in the token budget. For each candidate s
    U(s) = Q(s) + c_puct * P(s) * sqrt(N(root)) / (1 + N(s))
with N and Q counting virtual loss (tree.effective): N(s) = answers through s (+ pending picks),
Q(s) = their mean reward. The prior P(s) = softmax over the candidates of surprisal(s) / prior_temperature,
surprisal(s) = the student's mean negative token log-prob of the line(s) written right after s, averaged over
s's children (their sampled log-probs: no scoring request), so the search forks where the student was unsure
what to write next (TreeRL forks at high-entropy tokens); a candidate followed only by teacher text (no sampled
log-probs) counts as the candidates' mean, and with no log-probs at all the priors are uniform. Picks are taken
one at a time: each adds virtual loss along root..s, and no two picks of one round lie on one root-to-leaf path
(a pick blocks its ancestors and descendants), so a round's forks spread over different answers.

Backup: an answer's reward R goes along root..leaf (visits + 1, value_sum + R), so V(s) = mean reward of the
answers through s (a Monte Carlo value, as VinePPO and TreeRL use).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.search.lines import Line
from orchestrator.search.tree import Node, Tree, apply_virtual_loss, puct_score, softmax


@dataclass(frozen=True)
class Writer:
    """Who wrote an answer's lines: "student", or a teacher's name with kind "right" | "wrong"."""

    source: str
    kind: str


def add_answer(
    tree: Tree,
    start: Node,
    lines: list[Line],
    writer: Writer,
    *,
    token_counts: list[int],
    finish_reason: str | None,
    adapter_version: int | None = None,
) -> tuple[Node, list[Node]]:
    """Merge the answer start..lines[-1] into the tree; returns (its leaf, the nodes it created).

    `token_counts[i]` is the number of tokens of lines[i]. `start` is the node the lines follow (the root, or a
    fork point). The leaf keeps the finish reason of the answer that first wrote it; a node keeps the adapter
    version and the sampled tokens of the answer that created it."""
    if not lines:
        raise ValueError("an answer needs at least one line")
    node, created = start, []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        match = next(
            (c for c in tree.children(node) if c.text == line.text and c.terminal == last),
            None,
        )
        if match is None:
            match = tree.add_child(
                node,
                line.text,
                writer.source,
                writer.kind,
                step_logprob=line.mean_logprob,
                tokens=token_counts[i],
                finish_reason=finish_reason if last else None,
                adapter_version=adapter_version,
                token_ids=line.token_ids,
                sampler_logprobs=list(line.logprobs) if line.token_ids is not None else None,
            )
            match.terminal = last
            created.append(match)
        node = match
    return node, created


def fork_candidates(tree: Tree, max_tokens: int, min_room: int) -> list[Node]:
    """Internal nodes below the root with at least `min_room` tokens of the answer budget left after them."""
    return [
        n
        for n in tree
        if n.id != 0 and n.children and not n.terminal and max_tokens - n.path_tokens >= min_room
    ]


def surprisal_after(tree: Tree, node: Node) -> float | None:
    """Mean over `node`'s children of their line's surprisal (-mean token log-prob); None when none has
    sampled log-probs."""
    values = [-c.step_logprob for c in tree.children(node) if c.step_logprob is not None]
    return sum(values) / len(values) if values else None


def set_fork_priors(tree: Tree, candidates: list[Node], temperature: float) -> None:
    """P(s) = softmax over the candidates of surprisal_after(s) / temperature. A candidate followed only by
    teacher text (no sampled log-probs) counts as the candidates' mean surprisal; with none known, uniform."""
    if not candidates:
        return
    surprisals = [surprisal_after(tree, s) for s in candidates]
    known = [x for x in surprisals if x is not None]
    if known:
        mean = sum(known) / len(known)
        priors = softmax([mean if x is None else x for x in surprisals], temperature)
    else:
        priors = [1.0 / len(candidates)] * len(candidates)
    for node, prior in zip(candidates, priors, strict=True):
        node.prior = prior


def descendants(tree: Tree, node: Node) -> set[int]:
    out, stack = set(), list(node.children)
    while stack:
        i = stack.pop()
        out.add(i)
        stack.extend(tree.nodes[i].children)
    return out


def select_forks(
    tree: Tree,
    picks: int,
    *,
    c_puct: float,
    vl_value: float,
    prior_temperature: float,
    max_tokens: int,
    min_room: int,
) -> list[list[Node]]:
    """Up to `picks` fork points by PUCT, each as its path root..s with virtual loss added (remove it with
    tree.remove_virtual_loss after the backup)."""
    candidates = fork_candidates(tree, max_tokens, min_room)
    set_fork_priors(tree, candidates, prior_temperature)
    chosen: list[list[Node]] = []
    blocked: set[int] = set()
    for _ in range(picks):
        open_ = [s for s in candidates if s.id not in blocked]
        if not open_:
            break
        # Ties go to the earlier node (stable, reproducible).
        best = max(open_, key=lambda s: (puct_score(s, tree.root, c_puct, vl_value), -s.id))
        path = tree.path(best)
        apply_virtual_loss(path)
        chosen.append(path)
        blocked |= {n.id for n in path} | descendants(tree, best)
    return chosen
