"""Choosing the next token of many rows at once, each row with its own temperature, top-p and seed."""

from __future__ import annotations

import torch


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches top_p (per row).

    logits: (R, V) already divided by the temperature; top_p: (R,) in (0, 1]. The most likely token always stays.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p.unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: list[float],
    top_p: list[float],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> torch.Tensor:
    """One token id per row: greedy where temperature == 0, otherwise sampled after temperature and top-p.

    The draw stays on the logits' device (exponential race, equivalent to Gumbel-max: for i.i.d. E_v ~ Exp(1),
    argmax_v p_v / E_v is distributed as p), so no (rows x vocabulary) matrix goes to the host. Rows with a
    generator (a request seed; on the logits' device) draw from it, so a seeded request gives the same text
    whatever else shares its batch; the others draw from the engine's generator.
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, t in enumerate(temperature) if t > 0]
    if not sampled_rows:
        return chosen
    rows = torch.tensor(sampled_rows, device=logits.device)
    temps = torch.tensor([temperature[i] for i in sampled_rows], device=logits.device).unsqueeze(1)
    scaled = logits[rows] / temps
    if any(top_p[i] < 1.0 for i in sampled_rows):
        ps = torch.tensor([top_p[i] for i in sampled_rows], device=logits.device)
        scaled = top_p_filter(scaled, ps)
    probs = torch.softmax(scaled, dim=-1)
    race = torch.empty_like(probs)
    for k, row in enumerate(sampled_rows):
        race[k].exponential_(generator=generators[row] or default_generator)
    chosen[rows] = (probs / race).argmax(dim=-1)
    return chosen
