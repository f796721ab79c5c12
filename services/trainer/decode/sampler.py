"""Choosing every row's next token at once, in a fixed number of tensor operations (so it can be graph-captured).

Per row: temperature (0 = greedy), top-p, and a 62-bit seed. The randomness is a counter-based hash of
(seed, position): one uniform number per row and step, turned into a token by inverse-CDF sampling over the
(top-p truncated) distribution. A row's draw therefore depends only on its seed, its position and its own
logits: a seeded request repeats its text whatever shares its batch, and replaying a captured step draws the
same token as running it eagerly. No torch.Generator is involved (one per row would be one kernel per row).

Log-probs are those of the unscaled logits (log_softmax of the model's output), as the OpenAI API reports them.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: a 32-bit value times it stays inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanching 32-bit integer hash on int64 tensors holding values in [0, 2**32)."""
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    return x ^ (x >> 16)


def row_uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """(R,) float32 in the open interval (0, 1), a pure function of each row's seed (in [0, 2**62)) and counter."""
    x = _mix32((seed & _M32) ^ _mix32((seed >> 32) ^ _mix32(counter & _M32)))
    return ((x >> 9).float() + 0.5) * 2.0**-23  # 23 bits: exact in float32, never 0 or 1


def choose(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    *,
    sampled: bool,
    nucleus: bool,
    top_k: int,
    logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(tokens, log-prob of each token, top-k log-probs, their ids) for logits (R, V).

    sampled: some row has temperature > 0 (otherwise every row is greedy, and no distribution is built);
    nucleus: some sampled row has top_p < 1 (otherwise no sort); top_k: how many alternatives to return (0: none);
    logprobs: some row wants its token's log-prob (otherwise none is computed, and None returned for them: a
    log-softmax over the vocabulary is ~8% of the sampler's time on CPU at 32 rows).
    These are flags of the batch, chosen by the caller, so each combination is one fixed sequence of kernels.
    """
    logits = logits.float()
    largest, tokens = logits.max(dim=-1, keepdim=True)  # the first largest, as argmax: one pass for both
    tokens = tokens.squeeze(1)
    if sampled:
        scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        # Shifted so the largest logit is 0 first: a temperature near 0 (5e-324) then sends the others to -inf,
        # never the largest to +inf, whose softmax would be NaN (a 500 found by the schema fuzz).
        scaled = (logits - largest).div_(scale.unsqueeze(1))
        uniform = row_uniform(seed, counter).unsqueeze(1)
        if nucleus:
            scaled, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(scaled, dim=-1)
        cdf = probs.cumsum(dim=-1)
        last = cdf.shape[1] - 1
        if nucleus:
            # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays); top_p >= 1
            # keeps everything, whatever the rounding of the cumulative sum.
            threshold = torch.where(top_p < 1.0, top_p, torch.full_like(top_p, 2.0)).unsqueeze(1)
            kept = ((cdf - probs) < threshold).sum(dim=-1, keepdim=True).clamp(min=1)
            mass = cdf.gather(1, kept - 1)
            index = torch.searchsorted(cdf, uniform * mass).clamp(max=kept - 1)
            choice = order.gather(1, index).squeeze(1)
        else:
            index = torch.searchsorted(cdf, uniform * cdf[:, last:]).clamp(max=last)
            choice = index.squeeze(1)
        tokens = torch.where(temperature > 0, choice, tokens)
    if not (logprobs or top_k):
        return tokens, None, None, None
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if top_k:
        top_values, top_ids = log_probs.topk(top_k, dim=-1)
        return tokens, picked, top_values, top_ids
    return tokens, picked, None, None
