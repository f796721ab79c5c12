"""Checkpoint retention: which checkpoints a save sheds, and saves refused (507) before the budget or the disk
would overflow; then the same through real files (checkpoints.save_retained, delete_checkpoint)."""

import pytest

from services.trainer.checkpoint_retention import (
    OWN_SERIES,
    CheckpointRoomError,
    RetentionPolicy,
    StoredCheckpoint,
    plan_save,
    series_of,
    to_prune,
)

MiB = 2**20


def stored(*names: str, size: int = MiB) -> list[StoredCheckpoint]:
    return [StoredCheckpoint(name=n, created=float(i), bytes=size) for i, n in enumerate(names)]


def test_series_by_name():
    assert series_of("train-ab12-step000003") == "train-ab12"
    assert series_of("step-000004") == OWN_SERIES
    assert series_of("best") is None and series_of("step") is None and series_of("a-stepx") is None


def test_a_save_keeps_the_last_k_of_its_series_and_every_named_one():
    have = stored("j1-step000000", "best", "j1-step000001", "j2-step000000", "j1-step000002", "step-000001")
    pruned = to_prune(have, "j1-step000003", keep_last=2)
    assert [c.name for c in pruned] == ["j1-step000000", "j1-step000001"]  # j1-step000002 + the new one stay
    assert to_prune(have, "best", keep_last=1) == []  # named: never pruned
    assert [c.name for c in to_prune(have, "step-000002", keep_last=1)] == ["step-000001"]
    # Saving a name again (a rewound job) counts it as the newest, not as one more.
    assert [c.name for c in to_prune(have, "j1-step000001", keep_last=2)] == ["j1-step000000"]


def test_room_is_checked_after_what_the_save_frees():
    have = stored("j-step000000", "j-step000001", "named")
    policy = RetentionPolicy(keep_last=2, max_bytes=3 * MiB, min_free_bytes=0)
    # 3 MiB in use + 1 new - 1 pruned = 3 MiB: fits exactly
    assert [c.name for c in plan_save(have, 3 * MiB, 10 * MiB, "j-step000002", MiB, policy)] == [
        "j-step000000"
    ]
    with pytest.raises(CheckpointRoomError, match="TRAINER_CHECKPOINT_MAX_BYTES") as refused:
        plan_save(have, 3 * MiB, 10 * MiB, "other", MiB, policy)  # a new named one frees nothing
    assert refused.value.status == 507
    # replacing a name frees its old copy
    assert plan_save(have, 3 * MiB, 10 * MiB, "named", MiB, policy) == []
    with pytest.raises(CheckpointRoomError, match="TRAINER_CHECKPOINT_MIN_FREE_BYTES"):
        plan_save(have, 3 * MiB, 2 * MiB, "j-step000002", MiB, RetentionPolicy(2, None, 1 * MiB + 1))
    assert plan_save([], 0, 2 * MiB, "x", MiB, RetentionPolicy(1, None, MiB)) == []
