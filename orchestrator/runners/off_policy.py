"""The staleness limit: GRPO items whose student text came from an adapter version too far from the one the step
is applied onto are dropped before the step.

    age(item) = V - v(item)       V: the trainer's adapter version when the step is sent (the one it updates)
                                  v: the oldest version that wrote the item's student text (trajectories.py)
    kept   when 0 <= age <= max_versions (MAX_OFF_POLICY_VERSIONS), or the item has no student text (v unknown)

A sample of age a was drawn from the policy a updates back; the trainer's truncated importance weight corrects for
that only as far as the ratio pi_old / mu stays informative, so samples far behind are dropped (prime-rl's
max_off_policy_steps). A negative age means a version the trainer no longer has: it was rewound to a checkpoint
since, and a version number that comes back after a rewind stands for other weights.

What "old" means in this train loop: steps are strictly sequential. Each step's version is published to the
student server before the next search starts, and a trainer restart during a search throws that search's trees
away (the job rewinds to its checkpoint and searches again), so every sample of a step is of age 0. The limit bites
only where that chain breaks: after a rewind or restart that a search outlived (for instance an eval job that
published the trainer's version just before a train job rewound it, leaving the student server on the abandoned
version), or when something else steps the trainer during the search. It is the check that makes "the samples are
from the version being trained" a fact the step verifies rather than assumes.
"""

from __future__ import annotations

from orchestrator.runners.trajectories import GroupItem


def item_age(item: GroupItem, current_version: int) -> int | None:
    """How many versions the item's oldest student text is behind `current_version` (None: no student text or
    no version known)."""
    if item.adapter_version is None:
        return None
    return current_version - item.adapter_version


def drop_stale(
    items: list[GroupItem], current_version: int, max_versions: int
) -> tuple[list[GroupItem], list[GroupItem]]:
    """(kept, dropped): items of age 0..max_versions, or of unknown age, are kept."""
    kept, dropped = [], []
    for item in items:
        age = item_age(item, current_version)
        (kept if age is None or 0 <= age <= max_versions else dropped).append(item)
    return kept, dropped
