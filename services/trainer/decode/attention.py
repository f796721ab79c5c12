"""Attention over the slot cache, plugged into transformers through its attention-function registry.

transformers calls the registered function of a model's `attn_implementation` in every attention layer, with the
query, key and value of the new tokens (rotary positions already applied) and whatever keyword arguments the
caller passed to the model's forward. A forward given `slot_kv=SlotAttention(...)` therefore writes the new keys
and values into the slots and attends over the slot cache; any other forward (none is expected on these models,
but a fallback costs nothing) is plain SDPA. So the model's own code (projections, rotary, MLP, norms) stays
transformers', and only where K and V live is ours.

Grouped-query attention without copying K and V: the g = heads / kv_heads query heads that share a KV head are laid
out as g * L query rows of that KV head, so SDPA sees as many heads as the cache has and reads each K and V once
(transformers' sdpa path repeats K and V g times when a mask is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .slots import SlotCache

NAME = "slot_kv"


def register() -> str:
    """Register the slot attention under NAME (idempotent); returns the name to give set_attn_implementation."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def slot_attention(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, slot_kv=None, **kw
    ):
        if slot_kv is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
            )
        return slot_kv.attend(module.layer_idx, query, key, value, attention_mask, scaling)

    AttentionInterface.register(NAME, slot_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the fallback builds its masks as sdpa does
    return NAME


@dataclass
class SlotAttention:
    """One forward's view of the slot cache.

    write_slot, write_pos: (B * L,) where the new tokens' K and V go (row-major over batch and query position).
    read_slots: (B,) slots to attend over, gathered; None = slots 0..B-1 read in place (the decode step, whose
        batch row r is slot r, so nothing is copied).
    window: positions [0, window) are read; the mask (B, 1, L, window) says which of them each query sees.
    """

    cache: SlotCache
    write_slot: torch.Tensor
    write_pos: torch.Tensor
    read_slots: torch.Tensor | None
    window: int

    def attend(self, layer, query, key, value, mask, scaling):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        keys, values = self.cache.keys(layer), self.cache.values(layer)
        keys[self.write_slot, :, self.write_pos] = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
        values[self.write_slot, :, self.write_pos] = value.transpose(1, 2).reshape(
            batch * length, kv_heads, dim
        )
        if self.read_slots is None:
            keys, values = keys[:batch, :, : self.window], values[:batch, :, : self.window]
        else:
            keys = keys[:, :, : self.window].index_select(0, self.read_slots)
            values = values[:, :, : self.window].index_select(0, self.read_slots)
        grouped = query.reshape(batch, kv_heads, group * length, dim)
        if group > 1 and length > 1:
            mask = mask.repeat(1, 1, group, 1)  # query row (j, i) of a KV head is head j's position i
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None
