"""Scoring: the student's per-token log-probs of completions given their contexts (for /logprobs, for echoed
prompts, and inside the GRPO step, where they carry gradients)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .grpo import linear_selective_log_softmax, selective_log_softmax
from .items import ScoreItem
from .padding import pad, positions

if TYPE_CHECKING:
    from .items import GrpoItem
    from .student import Student


@torch.inference_mode()
def score(
    student: Student, items: list[ScoreItem], *, use_adapter: bool = True, batch_size: int = 16
) -> list[list[float]]:
    """Per-token log-probs of each item's completion given its context, in padded batches."""
    results: list[list[float]] = []
    with student.adapter(use_adapter):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            logp, _ = completion_logprobs(student, chunk)
            for row, item in enumerate(chunk):
                n = len(item.completion_ids)
                results.append(logp[row, logp.shape[1] - n :].tolist() if n else [])
    return results


def completion_logprobs(
    student: Student, items: Sequence[ScoreItem | GrpoItem]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probs of the completion tokens, right-aligned (left-padded), and their mask.

    The sequences run through the model right-padded: a left pad is a query that may attend to nothing,
    and on CUDA in bf16 such a fully masked row comes out NaN, which the backward pass of attention
    then spreads into the real keys' gradients (a GRPO step of mixed lengths failed with a non-finite
    gradient). Only the hidden states that predict completion tokens are gathered into the (B, T) layout
    and go through the lm_head, T being the longest completion, not the whole sequence.
    """
    device = student.device
    sequences = [list(it.context_ids) + list(it.completion_ids) for it in items]
    input_ids, mask = pad(sequences, student.pad_id, device, left=False)
    width = max(len(it.completion_ids) for it in items)
    lengths = torch.tensor([len(it.completion_ids) for it in items], device=device)
    starts = torch.tensor([len(it.context_ids) for it in items], device=device)
    column = torch.arange(width, device=device)
    completion_mask = (column >= (width - lengths).unsqueeze(1)).float()
    # Column t of row b predicts completion token t - (width - n_b), found at sequence position
    # start_b + that offset; its hidden state sits one position earlier. Masked columns point at position 0.
    target_pos = starts.unsqueeze(1) + column - (width - lengths).unsqueeze(1)
    target_pos = torch.where(completion_mask.bool(), target_pos, torch.ones_like(target_pos))
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=student.autocast):
        hidden = student.decoder(
            input_ids=input_ids, attention_mask=mask, position_ids=positions(mask), use_cache=False
        ).last_hidden_state
        student.forward_passes += 1
        if width == 0:
            empty = hidden.new_zeros(len(items), 0)
            return empty, empty
        targets = input_ids.gather(1, target_pos)
        predicting = hidden.gather(1, (target_pos - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if student.fused_head:
            return linear_selective_log_softmax(predicting, student.lm_head.weight, targets), completion_mask
        logits = student.lm_head(predicting)
    return selective_log_softmax(logits, targets), completion_mask
