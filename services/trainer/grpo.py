"""GRPO losses as pure torch functions over padded completion-token tensors.

Shapes: B sequences, T completion positions (right-aligned, padded), mask[b, t] = 1 for real completion tokens.
All per-token inputs are (B, T); advantages and weights are (B,).

Notation for one token t of sequence i:
    logp       = log pi_theta(y_t | x, y_<t)            (current policy, with gradient)
    old        = log pi_old(y_t | ...)                  (PPO's old policy as the trainer computes it; = logp.detach()
                                                          when not given, i.e. on-policy)
    mu         = log mu(y_t | ...)                      (the behaviour policy: the log-prob the sampling server, e.g.
                                                          vLLM, reported for the token it sampled; = old when not given)
    ref        = log pi_ref(y_t | ...)                  (the same model with adapters disabled, no gradient)
    ratio      = exp(logp - old)
    rho_t      = min(exp(old - mu), C)                  (truncated importance weight, no gradient; see is_weights)
    A_i        = the caller's advantage of sequence i;  w_i = its weight
    surrogate  = min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)    (PPO clipping)
    kl_t       = exp(ref - logp) - (ref - logp) - 1                                (k3 estimator, >= 0)
    l_t        = -(rho_t * surrogate - beta * kl_t)

Aggregations ("loss types"):
    grpo       L = 1/N sum_i w_i * (1/|y_i| sum_t l_t)       (per-sequence token mean, then mean; DeepSeekMath)
    dr_grpo    L = 1/N sum_i w_i * (1/L_max sum_t l_t)       (sum over tokens / a constant; Dr. GRPO, Liu 2025)
    legacy     L = 1/N sum_i w_i * (1/|y_i| sum_t (-rho_t * A_i * logp_t + beta * kl_t))
               reward-weighted SFT: the original project's update, kept as an ablation.
N is the number of sequences of the update (the step's items, or its mini-batch when loss.updates > 1; never a
micro-batch's), so micro-batch losses add up to L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def selective_log_softmax(
    logits: torch.Tensor, token_ids: torch.Tensor, chunk_rows: int = 1024
) -> torch.Tensor:
    """log_softmax(logits)[..., token_ids] without a full-vocabulary float32 log-softmax tensor.

    log p(y) = logit_y - logsumexp(logits), computed in float32 a chunk of rows at a time.
    logits: (..., V); token_ids: (...) -> (...) float32.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_ids = token_ids.reshape(-1)
    pieces = []
    for start in range(0, flat_logits.shape[0], chunk_rows):
        rows = flat_logits[start : start + chunk_rows]
        ids = flat_ids[start : start + chunk_rows]
        picked = rows.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
        pieces.append(picked - torch.logsumexp(rows.float(), dim=-1))
    if not pieces:
        return flat_logits.new_zeros(token_ids.shape, dtype=torch.float32)
    return torch.cat(pieces).reshape(token_ids.shape)


class _LinearSelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(h W^T)[y] a chunk of rows at a time; backward recomputes the chunk's logits.

    z_n = W h_n, lse_n = log sum_v exp(z_nv) (float32), logp_n = z_{n,y_n} - lse_n;
    dL/dh_n = sum_v g_n (1[v = y_n] - softmax(z_n)_v) W_v. W gets no gradient (LoRA never trains the output
    matrix), so only h, W, y and lse are saved: O(N) memory instead of the (N, V) logits and float32 copies.
    """

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


def linear_selective_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[..., targets] in float32; hidden (..., H), weight (V, H), targets (...)."""
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    logp = _LinearSelectiveLogSoftmax.apply(flat, weight, targets.reshape(-1), chunk_rows)
    return logp.reshape(shape)


def is_weights(proximal_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights of sampled tokens: rho_t = min(exp(old_t - mu_t), C), without gradient.

    The tokens were drawn from the behaviour policy mu (another engine's kernels and precision, maybe an older
    adapter version); the loss is an expectation under the trainer's policy. Weighting each token's term by
    pi_old/mu corrects the mismatch (Ionides 2008's truncated IS; Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"; TRL's vllm_importance_sampling_correction). Truncating at C
    bounds the variance a few rare tokens could add, at the price of a small bias; weights below 1 are kept.
    old is the trainer's log-prob of the policy the step starts from (the "proximal" policy of decoupled PPO),
    so PPO's clipped ratio pi/old is left as it is and rho only accounts for where the tokens came from.
    Tokens whose mu equals old (no sampler log-prob given) get rho = 1.
    """
    return torch.clamp(torch.exp(proximal_logp.detach() - sampler_logp), max=cap)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate on the sampled tokens: exp(d) - d - 1 with d = ref - logp."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


@dataclass(frozen=True)
class LossTerms:
    loss: torch.Tensor  # the scalar to backpropagate (this micro-batch's share of L)
    kl_sum: torch.Tensor  # sum of per-sequence mean KL (for reporting; divide by N)
    clipped_tokens: torch.Tensor  # number of tokens whose ratio was clipped in the surrogate
    tokens: torch.Tensor  # number of completion tokens
    truncated_tokens: torch.Tensor  # number of completion tokens whose importance weight hit the cap
    is_weight_sum: torch.Tensor  # sum of rho_t over completion tokens (1 for each on-policy token)


def grpo_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    loss_type: str = "grpo",
    old_logp: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    beta: float = 0.04,
    is_cap: float = 2.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    num_sequences: int | None = None,
    max_length: int | None = None,
) -> LossTerms:
    """The loss of one micro-batch; see the module docstring for the maths.

    num_sequences: N of the update (defaults to this batch's B); max_length: L_max for dr_grpo (defaults
    to this batch's T). sampler_logp: mu per token (None = every token on-policy, rho = 1); is_cap: C.
    """
    mask = mask.to(logp.dtype)
    batch = logp.shape[0]
    n = float(num_sequences or batch)
    weights = torch.ones(batch, dtype=logp.dtype, device=logp.device) if weights is None else weights.to(logp)
    adv = advantages.to(logp).unsqueeze(1)
    old = logp.detach() if old_logp is None else old_logp.to(logp)
    if sampler_logp is None:
        rho = torch.ones_like(logp)
        truncated = torch.zeros((), device=logp.device)
    else:
        sampler_logp = sampler_logp.to(logp)
        rho = is_weights(old, sampler_logp, is_cap)
        truncated = (((old.detach() - sampler_logp) > math.log(is_cap)).to(logp.dtype) * mask).sum()
    kl = k3_kl(logp, ref_logp.to(logp)) if ref_logp is not None else torch.zeros_like(logp)
    lengths = mask.sum(1).clamp(min=1.0)

    if loss_type == "legacy":
        per_token = -rho * adv * logp + beta * kl
        clipped = torch.zeros((), device=logp.device)
    elif loss_type in ("grpo", "dr_grpo"):
        ratio = torch.exp(logp - old)
        high = clip_eps if clip_eps_high is None else clip_eps_high
        unclipped = ratio * adv
        clipped_obj = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
        surrogate = torch.minimum(unclipped, clipped_obj)
        per_token = -(rho * surrogate - beta * kl)
        clipped = ((clipped_obj < unclipped).to(logp.dtype) * mask).sum().detach()
    else:
        raise ValueError(f"loss.type: unknown loss type {loss_type!r}")

    if loss_type == "dr_grpo":
        per_sequence = (per_token * mask).sum(1) / float(max_length or logp.shape[1])
    else:
        per_sequence = (per_token * mask).sum(1) / lengths
    loss = (weights * per_sequence).sum() / n
    kl_sum = ((kl * mask).sum(1) / lengths).sum().detach()
    return LossTerms(
        loss=loss,
        kl_sum=kl_sum,
        clipped_tokens=clipped,
        tokens=mask.sum().detach(),
        truncated_tokens=truncated,
        is_weight_sum=(rho * mask).sum().detach(),
    )
