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

import functools
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .slots import SlotCache

NAME = "slot_kv"
log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PackedLayout:
    """Where the tokens of a packed prefill (lane.py, Lane._prefill) sit for attention: several prompts' suffixes
    run end to end as one sequence of L tokens, and attention needs each suffix in a row of its own, `rows` rows
    of `width` queries (the mask's layout).

    index: (L,) token t's place in that layout flattened (row * width + column); rows * width for a padding token.
    own_keys: no row reuses cached positions (every suffix is its whole prompt), so each row attends over its own
        new keys and values, laid out as its queries are: the cache is written, not read.
    sequences, varlen: where a varlen attention serves (flash_varlen on CUDA): (rows + 2,) int32 boundaries of
        the prompts' suffixes in the sequence (the last span holds the padding tokens), and that attention
        function, which then runs on the sequence as it is, with no layout, mask or padding (None: through the
        layout).
    longest: with varlen, a bound on the tokens of any one of those sequences (it sizes the kernel's grid: the
        whole sequence's length would launch blocks for queries no sequence has).
    key_sequences, key_slots, key_positions: with varlen, where rows reuse cached prefixes: the keys to attend
        over, gathered from the cache into one sequence (each row's slot at positions [0, prefix + suffix), the
        new keys written there first), and their (rows + 2,) boundaries. None: each row's own new keys.
    """

    index: torch.Tensor
    rows: int
    width: int
    own_keys: bool
    sequences: torch.Tensor | None = None
    varlen: Callable[..., torch.Tensor] | None = None
    longest: int = 0
    key_sequences: torch.Tensor | None = None
    key_slots: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None

    def lay_out(self, states: torch.Tensor) -> torch.Tensor:
        """(1, h, L, dim) in sequence order -> (rows, h, width, dim); padding places hold zeros."""
        heads, dim = states.shape[1], states.shape[3]
        flat = states.new_zeros(self.rows * self.width + 1, heads, dim)  # + 1: where padding tokens go
        flat.index_copy_(0, self.index, states[0].transpose(0, 1))
        return flat[:-1].view(self.rows, self.width, heads, dim).transpose(1, 2)

    def gather(self, laid: torch.Tensor) -> torch.Tensor:
        """(rows, heads, width, dim) -> (1, L, heads, dim) in sequence order (a padding token reads the last
        place: its output is never used)."""
        heads, dim = laid.shape[1], laid.shape[3]
        flat = laid.transpose(1, 2).reshape(self.rows * self.width, heads, dim)
        return flat[self.index.clamp(max=self.rows * self.width - 1)].unsqueeze(0)


@dataclass
class SlotAttention:
    """One forward's view of the slot cache.

    write_slot, write_pos: (B * L,) where the new tokens' K and V go (row-major over batch and query position).
    read_slots: (B,) slots to attend over, gathered; None = slots 0..B-1 read in place (the decode step, whose
        batch row r is slot r, so nothing is copied).
    window: positions [0, window) are read; the mask (rows, 1, queries, window) says which of them each query
        sees. Its queries are the forward's L, or g * L already repeated for the g query heads of a KV head (the
        caller then repeats it once for every layer; see _attend).
    packed: the layout of a packed prefill (B = 1); None: the forward's own (B, L) is the mask's layout.
    """

    cache: SlotCache
    write_slot: torch.Tensor
    write_pos: torch.Tensor
    read_slots: torch.Tensor | None
    window: int
    packed: PackedLayout | None = None

    def attend(self, layer, query, key, value, mask, scaling):
        batch, _, length, dim = query.shape
        kv_heads = key.shape[1]
        keys, values = self.cache.keys(layer), self.cache.values(layer)
        keys[self.write_slot, :, self.write_pos] = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
        values[self.write_slot, :, self.write_pos] = value.transpose(1, 2).reshape(
            batch * length, kv_heads, dim
        )
        layout = self.packed
        if layout is not None and layout.varlen is not None:
            queries, new_keys, new_values = (
                t[0].transpose(0, 1) for t in (query, key, value)
            )  # (L, heads, dim)
            if layout.key_sequences is None:
                longest = layout.longest or length
                out = layout.varlen(
                    queries,
                    new_keys,
                    new_values,
                    layout.sequences,
                    layout.sequences,
                    longest,
                    longest,
                    scaling,
                )
            else:  # (keys, kv_heads, dim): the advanced indices around the slice go first
                keys = keys[layout.key_slots, :, layout.key_positions]
                values = values[layout.key_slots, :, layout.key_positions]
                out = layout.varlen(
                    queries,
                    keys,
                    values,
                    layout.sequences,
                    layout.key_sequences,
                    layout.longest or length,
                    keys.shape[0],
                    scaling,
                )
            return out.unsqueeze(0), None
        if layout is not None and layout.own_keys:
            keys, values = layout.lay_out(key), layout.lay_out(value)
        elif self.read_slots is None:
            keys, values = keys[:batch, :, : self.window], values[:batch, :, : self.window]
        else:
            keys = keys[:, :, : self.window].index_select(0, self.read_slots)
            values = values[:, :, : self.window].index_select(0, self.read_slots)
        if layout is None:
            return _attend(query, keys, values, mask, scaling).transpose(1, 2).contiguous(), None
        return layout.gather(_attend(layout.lay_out(query), keys, values, mask, scaling)), None


def _attend(query, keys, values, mask, scaling) -> torch.Tensor:
    """SDPA of query (B, heads, L, dim) over keys and values (B, kv_heads, window, dim); returns (B, heads, L,
    dim). Grouped-query attention without copying K and V (see the module's docstring)."""
    batch, heads, length, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group * length, dim)
    if group > 1 and mask.shape[2] == length > 1:  # not repeated yet by the caller
        mask = mask.repeat(1, 1, group, 1)  # query row (j, i) of a KV head is head j's position i
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim)


@functools.cache
def flash_varlen(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """torch's variable-length flash attention (torch.nn.attention.varlen, torch >= 2.10, CUDA), causal and with
    grouped KV heads, with varlen_reference's signature and meaning; None where it is missing, or where a probe
    of what the prefill needs (grouped heads, an empty sequence, queries after a cached prefix) fails or
    disagrees with varlen_reference."""
    if device.type != "cuda":
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = (
        {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}  # torch 2.10
    )
    if "enable_gqa" in parameters:
        options["enable_gqa"] = True

    def varlen(query, key, value, sequences, key_sequences, longest, longest_keys, scale) -> torch.Tensor:
        out = varlen_attn(
            query, key, value, sequences, key_sequences, longest, longest_keys, scale=scale, **options
        )
        return out[0] if isinstance(out, tuple) else out

    try:
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (  # strided as attend's: (heads, L, dim) transposed
            torch.randn(heads, 9, 64, device=device, dtype=torch.bfloat16, generator=generator).transpose(
                0, 1
            )
            for heads in (9, 3, 3)
        )
        # prompts of 5 and 3 tokens and an empty one over their own keys; then suffixes of 3 and 2 tokens after
        # cached prefixes of 4 and 0 tokens
        for bounds, key_bounds in (([0, 5, 8, 8], [0, 5, 8, 8]), ([0, 3, 5, 5], [0, 7, 9, 9])):
            sequences, key_sequences = (
                torch.tensor(b, dtype=torch.int32, device=device) for b in (bounds, key_bounds)
            )
            queries = q[: bounds[-1]]
            got = varlen(queries, k, v, sequences, key_sequences, bounds[-1], key_bounds[-1], 0.125)
            want = varlen_reference(
                queries, k, v, sequences, key_sequences, bounds[-1], key_bounds[-1], 0.125
            )
            if not torch.allclose(got.float(), want.float(), atol=2e-2):
                raise ValueError(f"differs from SDPA by {(got.float() - want.float()).abs().max().item()}")
    except Exception as exc:  # a kernel this build or card lacks: attention goes through the layout instead
        log.warning(
            "flash varlen attention unusable here, prefills attend through the padded layout: %r", exc
        )
        return None
    return varlen


def varlen_reference(
    query, key, value, sequences, key_sequences, longest, longest_keys, scale
) -> torch.Tensor:
    """Causal attention of packed sequences, one SDPA per sequence: query (L, heads, dim) and key, value (K,
    kv_heads, dim) hold the sequences end to end, sequences and key_sequences their (N + 1,) boundaries. Each
    sequence's queries are its last tokens: query i of a sequence of q queries over k keys sees keys [0, i + k -
    q]. Returns (L, heads, dim); tokens of empty key sequences get zeros. What flash_varlen's kernel computes, for
    its probe and for the tests on machines without it. longest and longest_keys only size that kernel's grid,
    and a sequence longer than they say is left partly uncomputed there: here it raises."""
    out = torch.zeros_like(query)
    bounds, key_bounds = sequences.tolist(), key_sequences.tolist()
    for name, edges, bound in (("queries", bounds, longest), ("keys", key_bounds, longest_keys)):
        if max(b - a for a, b in itertools.pairwise(edges)) > bound:
            raise ValueError(f"a sequence of {name} is longer than the bound given, {bound}: {edges}")
    for a, b, c, d in zip(bounds, bounds[1:], key_bounds, key_bounds[1:], strict=False):
        if b == a or d == c:
            continue
        q, k = b - a, d - c
        sees = (
            torch.arange(k, device=query.device) <= torch.arange(q, device=query.device).unsqueeze(1) + k - q
        )
        out[a:b] = F.scaled_dot_product_attention(
            query[a:b].transpose(0, 1),
            key[c:d].transpose(0, 1),
            value[c:d].transpose(0, 1),
            attn_mask=sees,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out
