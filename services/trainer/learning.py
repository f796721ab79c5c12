"""One GRPO step on the student: its items cut into one or more mini-batches (loss.updates), each a clipped
optimizer step over micro-batches with gradient accumulation and the loss of grpo.py, then a new adapter version.
Items are checked before anything changes; a step that fails leaves the adapter and optimizer as they were."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from services.protocol import LossSettings

from .errors import NotFiniteStep
from .grpo import grpo_loss
from .items import GrpoItem, StepResult, UpdateResult, check_grpo_items
from .scoring import completion_logprobs

if TYPE_CHECKING:
    from .student import Student


def micro_batches(lengths: list[int], *, size: int | None, token_budget: int) -> list[list[int]]:
    """The items' indices, shortest sequence first, cut into micro-batches: `size` items each when given, else
    as many as fit `token_budget` padded tokens (rows x the longest sequence of the micro-batch; an item longer
    than the budget goes alone). Shortest first keeps the padding of each micro-batch small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if size is not None:
        return [order[start : start + size] for start in range(0, len(order), size)]
    batches: list[list[int]] = []
    for i in order:
        # sorted: item i is the longest of the micro-batch it joins
        if batches and (len(batches[-1]) + 1) * lengths[i] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def update_batches(groups: Sequence[int | None], updates: int, *, seed: int) -> list[list[int]]:
    """The items' indices cut into min(updates, n) mini-batches, one per optimizer step.

    One update: every item, in order (the step as it always was). Several: the items shuffled with `seed` (the
    trainer's step number, so a run repeats), each group's items side by side in a shuffled order of groups
    (`groups[i]`: item i's group, None = a group of its own), then cut into contiguous pieces of n // k or
    n // k + 1 items. Equal pieces make the updates alike in size; a group stays within one mini-batch unless a
    cut falls inside it (at most k - 1 groups straddle two), so most updates see a prompt's right and wrong
    answers side by side, whose centred advantages cancel the push on what they share."""
    n = len(groups)
    k = max(1, min(updates, n))
    if k == 1:
        return [list(range(n))]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    rank: dict[tuple[str, int], int] = {}  # a group's place: where its first item fell in the shuffle
    for i in order:
        rank.setdefault(_group_key(groups, i), len(rank))
    order.sort(key=lambda i: rank[_group_key(groups, i)])  # stable: a group's items keep their shuffled order
    size, extra = divmod(n, k)
    batches, start = [], 0
    for j in range(k):
        stop = start + size + (1 if j < extra else 0)
        batches.append(order[start:stop])
        start = stop
    return batches


def _group_key(groups: Sequence[int | None], i: int) -> tuple[str, int]:
    group = groups[i]
    return ("item", i) if group is None else ("group", group)


def grpo_step(student: Student, items: list[GrpoItem], loss: LossSettings) -> StepResult:
    """`loss.updates` optimizer steps over the items: each one a mini-batch of update_batches, itself run in
    micro-batches with gradient accumulation. The adapter version goes up by one, however many updates ran.

    Update j over mini-batch B_j of N_j items minimises (grpo.py has l_t)
        grpo:     L_j = 1/N_j sum_{i in B_j} w_i * (1/|y_i| sum_t l_t)
        dr_grpo:  L_j = 1/N_j sum_{i in B_j} w_i * (1/L_max sum_t l_t)
    N_j is the mini-batch's own item count (each update is a mean over its items, as in TRL); L_max is the
    step's (loss.max_length, else the longest completion of all the items), one constant for every update as
    Dr. GRPO wants. How a mini-batch is cut into micro-batches changes the cost, never the gradient. One update
    (the default) is exactly the step over all items with N the step's item count.

    PPO's old policy pi_old in every update's ratio is the adapter before the first update: items without
    old_logprobs in mini-batches 2..k are scored once up front (no gradient), while the first mini-batch's use
    the live log-probs detached (ratio exactly 1). So from the second update on, the ratio measures how far the
    earlier updates moved the policy, and the clip bounds it. The sampler correction rho = min(pi_old/mu, C)
    uses the same pi_old.

    All or nothing: an update whose gradient is not finite (or any other error) raises, and the adapter and the
    optimizer's state are put back as they were before the first update; step and version do not move."""
    check_grpo_items(items)
    model, optimizer = student.model, student.optimizer
    batches = update_batches([it.group for it in items], loss.updates, seed=student.step)
    items = with_old_logprobs(student, items, [i for batch in batches[1:] for i in batch])
    max_length = loss.max_length or max(len(it.completion_ids) for it in items)
    saved = _snapshot(student) if len(batches) > 1 else None  # one update fails before it changes anything
    totals: dict[str, float] = dict.fromkeys(_SUMS, 0.0)
    per_update: list[UpdateResult] = []
    model.train()
    try:
        for batch in batches:
            result, sums = _update(student, [items[i] for i in batch], loss, max_length)
            per_update.append(result)
            for key, value in sums.items():
                totals[key] += value
    except BaseException:
        if saved is not None:
            _restore(student, saved)
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    student.step += 1
    student.adapter_version += 1
    n = len(items)
    sampled_elsewhere = sum(len(it.sampler_logprobs or []) for it in items)
    is_weight_mean, is_truncated_fraction = 1.0, 0.0
    if sampled_elsewhere:  # tokens without sampler log-probs weigh exactly 1: the rest of the sum is theirs
        is_weight_mean = (totals["is_weights"] - (totals["tokens"] - sampled_elsewhere)) / sampled_elsewhere
        is_truncated_fraction = totals["truncated"] / sampled_elsewhere
    return StepResult(
        loss=sum(u.loss * (u.items / n) for u in per_update),  # exactly the loss for one update
        kl=totals["kl"] / n,
        clip_fraction=totals["clipped"] / max(totals["tokens"], 1.0),
        grad_norm=sum(u.grad_norm for u in per_update) / len(per_update),
        tokens=int(totals["tokens"]),
        adapter_version=student.adapter_version,
        step=student.step,
        is_weight_mean=is_weight_mean,
        is_truncated_fraction=is_truncated_fraction,
        micro_batches=int(totals["passes"]),
        updates=len(per_update),
        per_update=per_update,
    )


_SUMS: tuple[str, ...] = ("kl", "clipped", "tokens", "truncated", "is_weights", "passes")


def _update(
    student: Student, chunk: list[GrpoItem], loss: LossSettings, max_length: int
) -> tuple[UpdateResult, dict[str, float]]:
    """One optimizer step over `chunk` (micro-batches with gradient accumulation), and its sums for the step's
    totals. Raises NotFiniteStep before the optimizer moves when the gradient is not finite."""
    optimizer = student.optimizer
    passes = micro_batches(
        [len(it.context_ids) + len(it.completion_ids) for it in chunk],
        size=loss.micro_batch_size,
        token_budget=student.micro_batch_tokens,
    )
    sums: dict[str, float] = dict.fromkeys(_SUMS, 0.0)
    sums["passes"] = float(len(passes))
    update_loss = 0.0
    optimizer.zero_grad(set_to_none=True)
    for batch in passes:
        rows = [chunk[i] for i in batch]
        ref_logp = None
        if loss.beta != 0.0:
            with torch.no_grad(), student.model.disable_adapter():
                ref_logp, _ = completion_logprobs(student, rows)
        logp, mask = completion_logprobs(student, rows)
        old = _per_token(rows, "old_logprobs", mask)
        if old is not None:  # items without old log-probs are on-policy: ratio 1
            old = torch.where(torch.isnan(old), logp.detach(), old)
        sampler = _per_token(rows, "sampler_logprobs", mask)
        if sampler is not None:  # items this trainer sampled: behaviour = old, weight 1
            sampler = torch.where(torch.isnan(sampler), logp.detach() if old is None else old, sampler)
        terms = grpo_loss(
            logp,
            mask,
            torch.tensor([it.advantage for it in rows], device=student.device),
            loss_type=loss.type,
            old_logp=old,
            sampler_logp=sampler,
            ref_logp=ref_logp,
            weights=torch.tensor([it.weight for it in rows], device=student.device),
            beta=loss.beta,
            is_cap=loss.is_cap,
            clip_eps=loss.clip_eps,
            clip_eps_high=loss.clip_eps_high,
            num_sequences=len(chunk),
            max_length=max_length,
        )
        terms.loss.backward()
        update_loss += float(terms.loss.detach())
        sums["kl"] += float(terms.kl_sum)
        sums["clipped"] += float(terms.clipped_tokens)
        sums["tokens"] += float(terms.tokens)
        sums["truncated"] += float(terms.truncated_tokens)
        sums["is_weights"] += float(terms.is_weight_sum)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.trainable, loss.max_grad_norm))
    if not math.isfinite(grad_norm):
        raise NotFiniteStep("the gradient is not finite")
    for group in optimizer.param_groups:
        group["lr"] = loss.learning_rate if loss.learning_rate is not None else student.base_learning_rate
    optimizer.step()
    result = UpdateResult(
        items=len(chunk),
        tokens=int(sums["tokens"]),
        loss=update_loss,
        grad_norm=grad_norm,
        clip_fraction=sums["clipped"] / max(sums["tokens"], 1.0),
    )
    return result, sums


def with_old_logprobs(student: Student, items: list[GrpoItem], indices: list[int]) -> list[GrpoItem]:
    """The items, those at `indices` that carry no old_logprobs given them from the current adapter (no
    gradient, packed by the trainer's token budget): PPO's old policy for the updates after the first."""
    missing = [i for i in indices if items[i].old_logprobs is None]
    if not missing:
        return items
    filled = list(items)
    passes = micro_batches(
        [len(items[i].context_ids) + len(items[i].completion_ids) for i in missing],
        size=None,
        token_budget=student.micro_batch_tokens,
    )
    with torch.no_grad():
        for batch in passes:
            rows = [items[missing[j]] for j in batch]
            logp, _ = completion_logprobs(student, rows)
            for row, item in enumerate(rows):
                scored = logp[row, logp.shape[1] - len(item.completion_ids) :].tolist()
                filled[missing[batch[row]]] = replace(item, old_logprobs=scored)
    return filled


def _snapshot(student: Student) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Copies of the adapter's weights and the optimizer's state (for LoRA, a few times the adapter's size)."""
    weights = [p.detach().clone() for p in student.trainable]
    return weights, copy.deepcopy(student.optimizer.state_dict())


def _restore(student: Student, snapshot: tuple[list[torch.Tensor], dict[str, Any]]) -> None:
    weights, optimizer_state = snapshot
    with torch.no_grad():
        for parameter, saved in zip(student.trainable, weights, strict=True):
            parameter.copy_(saved)
    student.optimizer.load_state_dict(optimizer_state)


def _per_token(items: list[GrpoItem], name: str, mask: torch.Tensor) -> torch.Tensor | None:
    """The items' per-token values of `name` (old_logprobs | sampler_logprobs) right-aligned like the mask;
    NaN on the real tokens of items without them, 0 on padding. None when no item has them."""
    if all(getattr(it, name) is None for it in items):
        return None
    values = torch.full(mask.shape, float("nan"), device=mask.device)
    width = mask.shape[1]
    for row, it in enumerate(items):
        given = getattr(it, name)
        if given:
            values[row, width - len(given) :] = torch.tensor(given, device=mask.device)
    return torch.where(mask.bool(), values, torch.zeros_like(values))
