"""Python's cyclic garbage collector, kept off the serving path.

A full (generation 2) collection walks every tracked object of the process, and a trainer process holds a great
many long-lived ones (torch, transformers, the model's modules): measured at ~130 ms per full collection on the
2-core CI machine. The collection runs on whichever thread allocated last, holding the GIL: the event loop stops
answering, or the decode thread stops launching steps, for that long, while the GPU idles. Once a process has
loaded, `freeze_heap()` moves everything alive into the permanent generation (gc.freeze), which no collection
walks again; later collections see only what serving allocates. vLLM freezes its engine's heap after warm-up the
same way (freeze_gc_heap), and SGLang offers it as an API.

What serving allocates mostly dies young, freed by reference counting before any collection sees it; a young
collection walks only what is alive when it runs (the requests in flight). Python starts one every 700 net
allocations: at 255 requests in flight on an H200 that was ~50 collections a second in the HTTP process, 6% of
its time even with the heap frozen (bench/RESULTS.md). YOUNG_COLLECTION_EVERY allocations instead make them rarer
at about the same cost each.

`GcPauses` counts the collections that still happen and their time, for /health.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

YOUNG_COLLECTION_EVERY = 20_000


def freeze_heap() -> int:
    """Collect once, then exempt every object alive now from later collections, and start young collections
    less often; the objects frozen."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)
    return gc.get_freeze_count()


@dataclass
class GcPauses:
    """Collections of this process and the time they held the GIL, from the moment it is made (gc.callbacks)."""

    collections: int = 0
    seconds: float = 0.0
    longest_s: float = 0.0
    _started: float = 0.0

    def __post_init__(self) -> None:
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.collections += 1
        self.seconds += pause
        self.longest_s = max(self.longest_s, pause)

    def close(self) -> None:
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)
