"""Every reward term of a search path, in one place.

For a path root -> s_1 -> ... -> s_k (k = depth of the leaf) the value is

    R = w_hre * HRE + clip(w_pre * A_k + length_penalty * k + sum_i bonus(d_i), -dense_cap, dense_cap)

- HRE (hard reward estimate): 1 when the path's final answer equals the gold answer numerically
  (`answers.same_number`, so "1,000" == "1000.0"), else 0. Non-terminal paths are scored by their rollout's
  answer.
- PRE (process reward estimate) of one step: the student's mean token log-prob of the step text (completion
  tokens only, from the trainer's POST /logprobs or the chat call's logprobs) minus a baseline b:
      pre_i = mean_logprob(s_i) - b
  The baseline is the running mean of the step mean-log-probs seen so far in the same tree (this expansion's
  steps included), frozen when the step is created. So pre > 0 marks a step the student finds more natural
  than its typical step in this tree, and the scale of the model's log-probs cancels out.
- Accumulated PRE with discount gamma (default 0.95): A_k = pre_k + gamma * A_{k-1}, A_0 = 0, i.e.
  A_k = sum_i gamma^(k-i) pre_i: recent steps weigh most.
- Length penalty: `length_penalty` per step of depth (default -0.01).
- Direction bonus: per step, +right_bonus (0.1) for a teacher "right" step (path code 1), +wrong_bonus (-0.05)
  for a teacher "wrong" step (code 0), 0 for student steps.
- The dense terms (PRE, length, direction) are clipped together to +-dense_cap (default 0.1), and settings
  keeps dense_cap < w_hre / 2: a correct path always scores above a wrong one, so the dense terms only break ties
  between paths of the same correctness (issue #19: on the student's own text an uncapped PRE decided most
  advantages, and those runs collapsed).
The weights are settings.RewardWeights; its defaults put correctness first: 1.0 HRE, 0 PRE, -0.01 per depth,
+0.1 right, -0.05 wrong, discount 0.95, dense cap 0.1 (the original's were 0.4 HRE and 0.6 PRE, uncapped).
"""

from __future__ import annotations

from orchestrator.gsm8k.answers import extract_answer, same_number
from orchestrator.settings import RewardWeights


def hre(text: str, gold: str) -> float:
    """1.0 when the answer in `text` (strict `####` first, else the last number) equals `gold`, else 0.0."""
    return 1.0 if same_number(extract_answer(text), gold) else 0.0


def step_pre(mean_logprob: float | None, baseline: float) -> float:
    """pre_i = mean_logprob - baseline; 0 when the step has no score (no trainer: PRE is switched off)."""
    return 0.0 if mean_logprob is None else mean_logprob - baseline


def accumulated_pre(parent_accumulated: float, pre: float, discount: float) -> float:
    """A_k = pre_k + discount * A_{k-1}."""
    return pre + discount * parent_accumulated


def length_term(depth: int, weights: RewardWeights) -> float:
    return weights.length_penalty * depth


def direction_term(directions: list[int | None], weights: RewardWeights) -> float:
    """Sum over the path's steps: right_bonus for 1, wrong_bonus for 0, nothing for student steps (None)."""
    return sum(weights.right_bonus if d == 1 else weights.wrong_bonus if d == 0 else 0.0 for d in directions)


def path_reward(
    hre_value: float, accumulated: float, depth: int, directions: list[int | None], weights: RewardWeights
) -> tuple[float, dict]:
    """The total R and its terms (already weighted), for logging and the tree JSON."""
    terms = {
        "hre": weights.hre * hre_value,
        "pre": weights.pre * accumulated,
        "length": length_term(depth, weights),
        "direction": direction_term(directions, weights),
    }
    dense = terms["pre"] + terms["length"] + terms["direction"]
    capped = max(-weights.dense_cap, min(weights.dense_cap, dense))
    if capped != dense:
        terms["dense_clip"] = capped - dense
    return terms["hre"] + capped, terms


class RunningMean:
    """The PRE baseline: mean of every value added so far."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0
