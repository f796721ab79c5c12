"""The search tree: nodes (one reasoning step each), selection scores, virtual loss and backprop.

Pure data and arithmetic: no I/O, no asyncio. The search (mcts.py) drives it.

Selection scores, with virtual loss folded in
(n = visits + virtual_loss, w = value_sum - virtual_loss * vl_value):
    Q(c)    = w(c) / n(c)                       (fpu when n(c) == 0)
    PUCT(c) = Q(c) + c_puct * P(c) * sqrt(max(1, n(parent))) / (1 + n(c))
    UCT(c)  = Q(c) + c_uct * sqrt(ln(max(1, n(parent))) / n(c))       (+inf when n(c) == 0)
Virtual loss: selecting a path adds 1 to virtual_loss of every node on it (a pretend visit that lost
`vl_value`), so concurrent simulations of one tree spread out; backprop removes it again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

ROOT = "root"
STUDENT = "student"


@dataclass
class Node:
    id: int
    parent: int | None
    text: str  # the step (one line, no trailing newline); "" for the root
    depth: int
    source: str  # "root" | "student" | teacher name
    kind: str  # "root" | "student" | "right" | "wrong"
    direction: int | None  # 1 teacher-right, 0 teacher-wrong, None student/root
    path_code: str  # one char per step from the root: "1" right, "0" wrong, "s" student
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    virtual_loss: int = 0
    step_logprob: float | None = None  # student's mean token log-prob of `text`
    # The student's adapter version that wrote this step (the serving engine says which; None: a teacher, the
    # root, or a server that does not say), and, from a student server that returns them, the sampled tokens of
    # the step with the log-probs that server gave them: the behaviour policy of the GRPO step's importance
    # correction (runners/trajectories.py).
    adapter_version: int | None = None
    token_ids: list[int] | None = None
    sampler_logprobs: list[float] | None = None
    step_pre: float = 0.0
    accumulated_pre: float = 0.0
    tokens: int = 0  # tokens of this step
    path_tokens: int = 0  # tokens from the root through this step
    similarity: float | None = None  # teacher step vs the student's samples of the same expansion (Jaccard)
    finish_reason: str | None = None
    terminal: bool = False
    terminal_reason: str | None = (
        None  # "answer_line" | "answer_phrase" | "eos" | "checker" | "depth_limit" | ...
    )
    answer: str | None = None
    correct: bool | None = None
    reward: float | None = None  # the exact path reward of a terminal node
    reward_terms: dict | None = None
    rollout: str | None = None  # the student's rollout text from this node, when one was made
    expanded: bool = False
    expand_failures: int = 0
    children: list[int] = field(default_factory=list)

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["value"] = self.value
        return data


class Tree:
    """Nodes in a flat list indexed by id; node 0 is the root (the question, empty partial solution)."""

    def __init__(self, problem_id: str, question: str, gold: str, messages: list[dict]):
        self.problem_id, self.question, self.gold, self.messages = problem_id, question, gold, messages
        self.nodes: list[Node] = [
            Node(id=0, parent=None, text="", depth=0, source=ROOT, kind=ROOT, direction=None, path_code="")
        ]

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def add_child(self, parent: Node, text: str, source: str, kind: str, **fields) -> Node:
        direction = 1 if kind == "right" else 0 if kind == "wrong" else None
        code = "1" if direction == 1 else "0" if direction == 0 else "s"
        node = Node(
            id=len(self.nodes),
            parent=parent.id,
            text=text,
            depth=parent.depth + 1,
            source=source,
            kind=kind,
            direction=direction,
            path_code=parent.path_code + code,
            **fields,
        )
        node.path_tokens = parent.path_tokens + node.tokens
        self.nodes.append(node)
        parent.children.append(node.id)
        return node

    def path(self, node: Node) -> list[Node]:
        """root .. node, inclusive."""
        out = [node]
        while out[-1].parent is not None:
            out.append(self.nodes[out[-1].parent])
        return out[::-1]

    def steps(self, node: Node) -> list[Node]:
        return self.path(node)[1:]

    def partial_text(self, node: Node) -> str:
        """The solution written so far at `node`, each step on its own line, ending in a newline (or "")."""
        texts = [n.text for n in self.steps(node)]
        return "".join(t + "\n" for t in texts)

    def children(self, node: Node) -> list[Node]:
        return [self.nodes[i] for i in node.children]

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes if not n.children]

    def to_json(self) -> dict:
        return {
            "problem_id": self.problem_id,
            "question": self.question,
            "gold": self.gold,
            "messages": self.messages,
            "root": 0,
            "nodes": [n.to_json() for n in self.nodes],
        }


# --- selection ----------------------------------------------------------------------------------------------
def effective(node: Node, vl_value: float) -> tuple[int, float]:
    """(n, w) with virtual loss counted as extra visits that each lost `vl_value`."""
    return node.visits + node.virtual_loss, node.value_sum - node.virtual_loss * vl_value


def q_value(node: Node, vl_value: float = 1.0, fpu: float = 0.0) -> float:
    n, w = effective(node, vl_value)
    return w / n if n else fpu


def puct_score(child: Node, parent: Node, c_puct: float, vl_value: float = 1.0, fpu: float = 0.0) -> float:
    n_parent, _ = effective(parent, vl_value)
    n_child, _ = effective(child, vl_value)
    return q_value(child, vl_value, fpu) + c_puct * child.prior * math.sqrt(max(1, n_parent)) / (1 + n_child)


def uct_score(child: Node, parent: Node, c_uct: float, vl_value: float = 1.0, fpu: float = 0.0) -> float:
    n_parent, _ = effective(parent, vl_value)
    n_child, _ = effective(child, vl_value)
    if n_child == 0:
        return math.inf
    return q_value(child, vl_value, fpu) + c_uct * math.sqrt(math.log(max(1, n_parent)) / n_child)


def best_child(
    tree: Tree,
    parent: Node,
    selection: str,
    c: float,
    vl_value: float = 1.0,
    fpu: float = 0.0,
    exclude: set[int] | frozenset = frozenset(),
) -> Node | None:
    """The child with the highest PUCT/UCT score; ties go to the earlier child (stable, reproducible)."""
    score = puct_score if selection == "puct" else uct_score
    best, best_score = None, -math.inf
    for child in tree.children(parent):
        if child.id in exclude:
            continue
        s = score(child, parent, c, vl_value, fpu)
        if best is None or s > best_score:
            best, best_score = child, s
    return best


def apply_virtual_loss(path: list[Node]) -> None:
    for node in path:
        node.virtual_loss += 1


def remove_virtual_loss(path: list[Node]) -> None:
    for node in path:
        if node.virtual_loss <= 0:
            raise RuntimeError(f"virtual loss underflow at node {node.id}")
        node.virtual_loss -= 1


def backprop(path: list[Node], value: float) -> None:
    """One visit with `value` on every node of root..leaf."""
    for node in path:
        node.visits += 1
        node.value_sum += value


def softmax(xs: list[float], temperature: float = 1.0) -> list[float]:
    if not xs:
        return []
    t = max(temperature, 1e-6)
    m = max(xs)
    exps = [math.exp((x - m) / t) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity of two texts (lower-cased whitespace tokens)."""
    sa, sb = set(a.lower().split()), set(b.lower().split())
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
