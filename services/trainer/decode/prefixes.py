"""Which slot holds which tokens' KV, so a prompt that starts with tokens some slot already holds reuses them.

A slot's content is the tokens whose keys and values it holds, in order from position 0: a prompt, and once its
row has finished, the tokens generated and fed back (added then, not one by one at every step: a prompt that
extends an answer is sent after the answer came back). It stays valid after its row finished, until the slot is
given to another row. Prefixes are found by whole blocks of BLOCK tokens: each block is keyed by a hash chained over all blocks
before it (as vLLM's prefix caching does), so one dictionary look-up per block finds every slot that holds the
same first k blocks. A match is then checked token by token (a hash is not proof) and extended past the last
whole block as far as the tokens agree.
"""

from __future__ import annotations

BLOCK = 16


def block_hashes(tokens: list[int], start: int = 0, previous: int | None = None) -> list[int]:
    """Chained hashes of the whole blocks of tokens from block `start` on (`previous`: the hash of block start-1)."""
    hashes = []
    for begin in range(start * BLOCK, len(tokens) - BLOCK + 1, BLOCK):
        previous = hash((previous, tuple(tokens[begin : begin + BLOCK])))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    def __init__(self, slots: int):
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # per slot: the tokens whose KV it holds
        self._blocks: list[list[int]] = [[] for _ in range(slots)]  # per slot: its block hashes
        self._owners: dict[int, set[int]] = {}  # block hash -> slots holding that prefix

    def forget(self, slot: int) -> None:
        for key in self._blocks[slot]:
            owners = self._owners.get(key)
            if owners is not None:
                owners.discard(slot)
                if not owners:
                    del self._owners[key]
        self._blocks[slot] = []
        self.tokens[slot] = []

    def clear(self) -> None:
        for slot in range(len(self.tokens)):
            self.forget(slot)

    def assign(self, slot: int, tokens: list[int]) -> None:
        """The slot now holds exactly `tokens`."""
        self.forget(slot)
        self.tokens[slot] = list(tokens)
        self._add_blocks(slot, block_hashes(self.tokens[slot]))

    def extend(self, slot: int, tokens: list[int]) -> None:
        """More tokens' KV was written at the end of the slot's content."""
        held = self.tokens[slot]
        held.extend(tokens)
        blocks = self._blocks[slot]
        self._add_blocks(slot, block_hashes(held, len(blocks), blocks[-1] if blocks else None))

    def move(self, source: int, target: int) -> None:
        """The target slot now holds a copy of the source's content (the source keeps its own)."""
        self.assign(target, self.tokens[source])

    def longest(self, prompt: list[int], hashes: list[int], limit: int) -> tuple[int | None, int]:
        """(slot, length): a slot holding the longest prefix of prompt, at most `limit` tokens; (None, 0) if none.
        `hashes` are block_hashes(prompt)."""
        found: set[int] | None = None
        blocks = 0
        for key in hashes:
            owners = self._owners.get(key)
            if not owners or blocks * BLOCK >= limit:
                break
            found, blocks = owners, blocks + 1
        if not found:
            return None, 0
        best, best_length = None, 0
        for slot in sorted(found):
            held = self.tokens[slot]
            length = blocks * BLOCK
            if held[:length] != prompt[:length]:
                continue  # a hash collision
            length = _agree(held, prompt, length, min(len(held), len(prompt), limit))
            if length > best_length:
                best, best_length = slot, min(length, limit)
        return best, best_length

    def _add_blocks(self, slot: int, hashes: list[int]) -> None:
        self._blocks[slot].extend(hashes)
        for key in hashes:
            self._owners.setdefault(key, set()).add(slot)


def _agree(a: list[int], b: list[int], start: int, stop: int) -> int:
    """The end of the run of equal tokens of a and b from `start` (at most `stop`), by bisecting on slice equality
    (list comparisons run in C; a token-by-token loop over a long prompt would not)."""
    low, high = start, max(start, stop)  # a[:low] == b[:low] holds; find the largest such low <= high
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low
