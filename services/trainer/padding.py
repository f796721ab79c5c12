"""Token-id lists to padded (ids, attention mask) tensors, and the position ids a padded batch needs."""

from __future__ import annotations

import torch


def pad(
    sequences: list[list[int]], pad_id: int, device: torch.device, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, longest); left padding for decoding (every row ends at the last column)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip the padding (0 for pads before the first real token)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
