"""One GRPO step on the student: micro-batches of scored completions, the loss of grpo.py, gradient accumulation,
a clipped optimizer step, and a new adapter version. Items are checked before anything changes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from services.protocol import LossSettings

from .errors import InvalidRequest, NotFiniteStep
from .grpo import grpo_loss
from .items import GrpoItem, StepResult
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


def grpo_step(student: Student, items: list[GrpoItem], loss: LossSettings) -> StepResult:
    """One optimizer step over all items (micro-batches with gradient accumulation).

    The loss of grpo.py is normalised by the step's N and (dr_grpo) L_max, not the micro-batch's, so how the
    items are cut into micro-batches changes the cost, never the gradient."""
    check_grpo_items(items)
    model, optimizer = student.model, student.optimizer
    n = len(items)
    max_length = loss.max_length or max(len(it.completion_ids) for it in items)
    batches = micro_batches(
        [len(it.context_ids) + len(it.completion_ids) for it in items],
        size=loss.micro_batch_size,
        token_budget=student.micro_batch_tokens,
    )
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0, "truncated": 0.0, "is_weights": 0.0}
    sampled_elsewhere = sum(len(it.sampler_logprobs or []) for it in items)
    optimizer.zero_grad(set_to_none=True)
    model.train()
    try:
        for batch in batches:
            chunk = [items[i] for i in batch]
            ref_logp = None
            if loss.beta != 0.0:
                with torch.no_grad(), model.disable_adapter():
                    ref_logp, _ = completion_logprobs(student, chunk)
            logp, mask = completion_logprobs(student, chunk)
            old = _per_token(chunk, "old_logprobs", mask)
            if old is not None:  # items without old log-probs are on-policy: ratio 1
                old = torch.where(torch.isnan(old), logp.detach(), old)
            sampler = _per_token(chunk, "sampler_logprobs", mask)
            if sampler is not None:  # items this trainer sampled: behaviour = old, weight 1
                sampler = torch.where(torch.isnan(sampler), logp.detach() if old is None else old, sampler)
            terms = grpo_loss(
                logp,
                mask,
                torch.tensor([it.advantage for it in chunk], device=student.device),
                loss_type=loss.type,
                old_logp=old,
                sampler_logp=sampler,
                ref_logp=ref_logp,
                weights=torch.tensor([it.weight for it in chunk], device=student.device),
                beta=loss.beta,
                is_cap=loss.is_cap,
                clip_eps=loss.clip_eps,
                clip_eps_high=loss.clip_eps_high,
                num_sequences=n,
                max_length=max_length,
            )
            terms.loss.backward()
            totals["loss"] += float(terms.loss.detach())
            totals["kl"] += float(terms.kl_sum)
            totals["clipped"] += float(terms.clipped_tokens)
            totals["tokens"] += float(terms.tokens)
            totals["truncated"] += float(terms.truncated_tokens)
            totals["is_weights"] += float(terms.is_weight_sum)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.trainable, loss.max_grad_norm))
        if not math.isfinite(grad_norm):
            raise NotFiniteStep("the gradient is not finite")
        for group in optimizer.param_groups:
            group["lr"] = loss.learning_rate if loss.learning_rate is not None else student.base_learning_rate
        optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    student.step += 1
    student.adapter_version += 1
    is_weight_mean, is_truncated_fraction = 1.0, 0.0
    if sampled_elsewhere:  # tokens without sampler log-probs weigh exactly 1: the rest of the sum is theirs
        is_weight_mean = (totals["is_weights"] - (totals["tokens"] - sampled_elsewhere)) / sampled_elsewhere
        is_truncated_fraction = totals["truncated"] / sampled_elsewhere
    return StepResult(
        loss=totals["loss"],
        kl=totals["kl"] / n,
        clip_fraction=totals["clipped"] / max(totals["tokens"], 1.0),
        grad_norm=grad_norm,
        tokens=int(totals["tokens"]),
        adapter_version=student.adapter_version,
        step=student.step,
        is_weight_mean=is_weight_mean,
        is_truncated_fraction=is_truncated_fraction,
        micro_batches=len(batches),
    )


def check_grpo_items(items: list[GrpoItem]) -> None:
    """Raise InvalidRequest naming the first item field the step cannot use (token-level checks the request
    model cannot make: an empty tokenisation, old log-probs of the wrong length)."""
    if not items:
        raise InvalidRequest("items", "at least one item is required")
    for i, it in enumerate(items):
        if not it.completion_ids:
            raise InvalidRequest(f"items[{i}].completion", "must contain at least one token")
        if not math.isfinite(it.advantage):
            raise InvalidRequest(f"items[{i}].advantage", "must be finite")
        if not math.isfinite(it.weight):
            raise InvalidRequest(f"items[{i}].weight", "must be finite")
        for name in ("old_logprobs", "sampler_logprobs"):
            values = getattr(it, name)
            if values is None:
                continue
            if len(values) != len(it.completion_ids):
                raise InvalidRequest(
                    f"items[{i}].{name}",
                    f"{len(values)} values for {len(it.completion_ids)} completion tokens",
                )
            if not all(math.isfinite(x) for x in values):
                raise InvalidRequest(f"items[{i}].{name}", "must be finite")


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
