"""The naive GRPO baseline: the original project's way of computing an update, kept only to measure against.

What makes it naive (each point is what the fast path does differently):
- one sequence at a time: a forward and a backward per sequence, no padding, no batching;
- full-vocabulary log-softmax in float32 of the policy's logits (T x V floats per sequence, kept for backward);
- a deep-copied reference model (a second copy of the weights in memory) run separately;
- full-vocabulary KL(pi_theta || pi_ref) = sum_v p_theta(v) (log p_theta(v) - log p_ref(v)) per token, float32.

Loss of one sequence i with completion tokens y_1..y_T (reward-weighted log-likelihood plus KL, as the original):
    l_i = -A_i * (1/T) sum_t log p_theta(y_t) + beta * (1/T) sum_t KL_t
The step's loss is the mean over sequences; gradients accumulate per sequence, then one optimizer step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sequence:
    input_ids: torch.Tensor  # (L,) prompt + completion token ids, on the model's device
    prompt_len: int          # completion tokens are input_ids[prompt_len:]
    advantage: float


def deep_copied_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The original's reference: a frozen deep copy of the whole model (weights twice in memory)."""
    reference = copy.deepcopy(model)
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def full_vocab_logprobs(model: torch.nn.Module, seq: Sequence) -> torch.Tensor:
    """(T, V) float32 log-probabilities of every vocabulary entry at each completion position."""
    logits = model(input_ids=seq.input_ids.unsqueeze(0)).logits[0]
    return torch.log_softmax(logits[seq.prompt_len - 1:-1].float(), dim=-1)


def naive_logprobs(model: torch.nn.Module, seqs: list[Sequence]) -> list[torch.Tensor]:
    """Per-token log-probs of each completion, one forward per sequence, full float32 log-softmax."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            full = full_vocab_logprobs(model, seq)
            targets = seq.input_ids[seq.prompt_len:]
            out.append(full.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return out


def naive_grpo_step(policy: torch.nn.Module, reference: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    seqs: list[Sequence], beta: float = 0.04, max_grad_norm: float = 1.0) -> dict:
    """One update the original's way; returns the mean loss and KL as floats."""
    policy.train()
    total_loss, total_kl = 0.0, 0.0
    for seq in seqs:
        logp_full = full_vocab_logprobs(policy, seq)
        with torch.no_grad():
            ref_full = full_vocab_logprobs(reference, seq)
        targets = seq.input_ids[seq.prompt_len:]
        token_logp = logp_full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        kl = (logp_full.exp() * (logp_full - ref_full)).sum(-1)
        loss = (-seq.advantage * token_logp.mean() + beta * kl.mean()) / len(seqs)
        loss.backward()
        total_loss += float(loss)
        total_kl += float(kl.mean()) / len(seqs)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total_loss, "kl": total_kl}
