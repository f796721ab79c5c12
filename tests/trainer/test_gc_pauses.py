"""gc_pauses: a frozen heap is left out of later collections, and every collection is counted with its time."""

from __future__ import annotations

import gc

from services.trainer.gc_pauses import YOUNG_COLLECTION_EVERY, GcPauses, freeze_heap


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_collections_are_counted_with_their_time():
    pauses = GcPauses()
    try:
        gc.collect()
        gc.collect(0)
        assert pauses.collections == 2
        assert pauses.seconds > 0 and 0 < pauses.longest_s <= pauses.seconds
    finally:
        pauses.close()
    gc.collect()
    assert pauses.collections == 2  # closed: no longer called


def test_a_frozen_heap_is_not_walked_again():
    threshold = gc.get_threshold()
    try:
        alive = [Cycle() for _ in range(10_000)]
        frozen = freeze_heap()
        assert gc.get_threshold()[0] == YOUNG_COLLECTION_EVERY
        assert frozen == gc.get_freeze_count() >= 10_000
        # The frozen cycles are exempt: a full collection finds nothing of theirs even once they are garbage,
        # while a cycle made after the freeze is still collected.
        del alive
        after = Cycle()
        del after
        assert (
            0 < gc.collect() < 10
        )  # the new cycle (and its __dict__, where tracked apart), none of the 10,000
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.collect()
