"""The staleness limit (runners/off_policy.py): items whose student text is too many adapter versions behind the
version the step updates, or from a version a rewind abandoned, are dropped; items without student text stay."""

from orchestrator.runners.off_policy import drop_stale, item_age
from orchestrator.runners.trajectories import GroupItem


def item(version: int | None) -> GroupItem:
    return GroupItem([], "", f"v{version}", 1.0, "student", 1.0, adapter_version=version)


def test_items_more_than_k_versions_behind_or_ahead_are_dropped():
    items = [item(v) for v in (5, 4, 3, 6, None)]
    assert [item_age(i, 5) for i in items] == [0, 1, 2, -1, None]
    kept, dropped = drop_stale(items, current_version=5, max_versions=1)
    assert [i.adapter_version for i in kept] == [5, 4, None]
    assert [i.adapter_version for i in dropped] == [3, 6]  # too old, and from a version the trainer lost
    kept, dropped = drop_stale(items, current_version=5, max_versions=0)
    assert [i.adapter_version for i in kept] == [5, None] and len(dropped) == 3
