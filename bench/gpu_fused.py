"""Selective log-softmax fused with the output projection, chunked over rows: no (N, V) tensor is kept.

For hidden states h_n (N, H), the (frozen) output matrix W (V, H) and targets y_n:
    z_n      = W h_n                                   (logits of row n, computed a chunk of rows at a time)
    lse_n    = log sum_v exp(z_nv)                     (float32)
    logp_n   = z_{n, y_n} - lse_n
Backward, for an upstream gradient g_n of logp_n:
    dL/dz_nv = g_n * (1[v = y_n] - softmax(z_n)_v)     (recomputed from h, W and the saved lse)
    dL/dh_n  = sum_v dL/dz_nv W_v
W gets no gradient (the LoRA student never trains the output matrix), so only h, W, y and lse (N floats) are
saved: memory is O(N) plus one chunk of logits, against O(N * V) for logits + float32 log-softmax.
"""

from __future__ import annotations

import torch

# The trainer's own implementation (merged from this bench); the stage below binds it onto an engine that lacks it.
from services.trainer.grpo import linear_selective_log_softmax


def fused_completion_logprobs(student, items) -> tuple[torch.Tensor, torch.Tensor]:
    """services.trainer.student.Student._completion_logprobs with the lm_head fused into the log-softmax.

    Same inputs, outputs and padding layout (left-padded, completions right-aligned); the (B, T, V) logits and
    their float32 copies are never stored. Bound onto a Student by the benchmark to measure the proposed patch.
    """
    from services.trainer.padding import positions as _positions

    sequences = [list(it.context_ids) + list(it.completion_ids) for it in items]
    input_ids, mask = student._left_pad(sequences)
    width = max(len(it.completion_ids) for it in items)
    hidden = student.decoder(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                             use_cache=False).last_hidden_state
    student.forward_passes += 1
    lengths = torch.tensor([len(it.completion_ids) for it in items], device=input_ids.device)
    columns = torch.arange(width, device=input_ids.device)
    completion_mask = (columns.unsqueeze(0) >= (width - lengths).unsqueeze(1)).float()
    if width == 0:
        empty = hidden.new_zeros(len(items), 0)
        return empty, empty
    logp = linear_selective_log_softmax(hidden[:, -width - 1:-1, :], student.lm_head.weight, input_ids[:, -width:])
    return logp, completion_mask
