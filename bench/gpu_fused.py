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


class _LinearSelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        rows = hidden.shape[0]
        logp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            logits = hidden[start:stop] @ weight.t()
            lse[start:stop] = torch.logsumexp(logits.float(), dim=-1)
            picked = logits.gather(-1, targets[start:stop].unsqueeze(-1)).squeeze(-1).float()
            logp[start:stop] = picked - lse[start:stop]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_logp = grad_logp.float()
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, hidden.shape[0])
            logits = (hidden[start:stop] @ weight.t()).float()
            g = grad_logp[start:stop].unsqueeze(-1)
            grad_logits = torch.exp(logits - lse[start:stop].unsqueeze(-1)).mul_(-g)
            grad_logits.scatter_add_(-1, targets[start:stop].unsqueeze(-1), g)
            grad_hidden[start:stop] = grad_logits.to(hidden.dtype) @ weight
        return grad_hidden, None, None, None


def linear_selective_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_rows: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[..., targets] in float32; hidden (..., H), weight (V, H), targets (...)."""
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    logp = _LinearSelectiveLogSoftmax.apply(flat, weight, targets.reshape(-1), chunk_rows)
    return logp.reshape(shape)


def fused_completion_logprobs(student, items) -> tuple[torch.Tensor, torch.Tensor]:
    """services.trainer.student.Student._completion_logprobs with the lm_head fused into the log-softmax.

    Same inputs, outputs and padding layout (left-padded, completions right-aligned); the (B, T, V) logits and
    their float32 copies are never stored. Bound onto a Student by the benchmark to measure the proposed patch.
    """
    from services.trainer.student import _positions

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
