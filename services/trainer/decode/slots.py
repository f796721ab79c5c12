"""The KV cache as fixed slots: one slot per decoding row, each a contiguous run of positions in every layer.

Why slots and not a growing cache: a decode step then reads and writes the cache in place, with shapes that depend
only on how many slots it covers and how far it reads, so the step can be captured once as a CUDA graph and
replayed; rows join and leave by taking and freeing slots, with no cache copy (the transformers DynamicCache loop
concatenated every layer's cache at each join and re-indexed it at each leave). A slot's content outlives its row,
so a later prompt that starts with the same tokens copies that prefix instead of computing it again (prefixes.py).

Layout: one tensor [layers, 2 (K, V), slots + 1, kv_heads, capacity, head_dim]. The extra last slot is scratch:
rows that are not live in a step write there, so they never touch a slot whose content may be reused.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        allocated: int | None = None,
    ):
        self.slots = slots  # the most slots it may grow to
        # Zeros, not empty: a row that reads a never-written position (masked out, but still multiplied) must not
        # meet a NaN bit pattern, which a masked softmax does not cancel.
        self.kv = torch.zeros(
            layers,
            2,
            min(allocated or slots, slots) + 1,
            kv_heads,
            capacity,
            head_dim,
            dtype=dtype,
            device=device,
        )

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def allocated(self) -> int:
        """Slots that have memory now (0..allocated-1); the scratch slot is the one after them."""
        return self.kv.shape[2] - 1

    @property
    def scratch(self) -> int:
        return self.kv.shape[2] - 1

    def keys(self, layer: int) -> torch.Tensor:
        """[allocated + 1, kv_heads, capacity, head_dim], a view."""
        return self.kv[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def grow(self, *, positions: int = 0, slots: int = 0) -> bool:
        """Make room for `positions` per slot and for slots 0..`slots`-1 (each doubling, at most self.slots slots;
        contents kept). True when the tensor was replaced, which invalidates anything that captured its address
        (the CUDA graphs). Slots grow with use, so a large TRAINER_MAX_BATCH_SIZE costs memory only once that many
        rows decode at once."""
        capacity, allocated = self.capacity, self.allocated
        while capacity < positions:
            capacity *= 2
        while allocated < min(slots, self.slots):
            allocated = min(2 * allocated, self.slots)
        if (capacity, allocated) == (self.capacity, self.allocated):
            return False
        shape = list(self.kv.shape)
        shape[2], shape[4] = allocated + 1, capacity
        grown = self.kv.new_zeros(shape)
        grown[:, :, : self.allocated, :, : self.capacity].copy_(self.kv[:, :, : self.allocated])
        self.kv = grown
        return True

    def copy(self, source: int, targets: list[int], length: int) -> None:
        """Copy positions [0, length) of slot `source` into each target slot, in every layer (one kernel)."""
        targets = [t for t in targets if t != source]
        if not targets or length <= 0:
            return
        if len(targets) == 1:
            self.kv[:, :, targets[0], :, :length] = self.kv[:, :, source, :, :length]
            return
        index = to_device(torch.tensor(targets), self.kv.device)
        rows = self.kv[:, :, source : source + 1, :, :length].expand(-1, -1, len(targets), -1, -1, -1)
        self.kv[:, :, :, :, :length].index_copy_(2, index, rows.contiguous())


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: from pageable memory, CUDA waits for all queued work
    before a copy to the device, which would stall the overlapped decode loop; from pinned memory it does not (and
    torch keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
