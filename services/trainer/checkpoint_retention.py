"""Which checkpoints stay on disk: the last K of each series and every named one, within a byte budget and with
room left on the disk. Pure decisions over what the folder holds; checkpoints.py does the reading and deleting.

Series. A checkpoint's name says which series it belongs to:
    <job>-step<digits>   the series <job> (what the orchestrator saves for a train job: "train-ab12-step000003")
    step-<digits>        the trainer's own series (a save that gave no name)
    anything else        a named checkpoint: kept until deleted (DELETE /checkpoints/{name})
After a save, its series keeps its `keep_last` newest checkpoints (by save time, so after a rewind the one the job
saved last is the one it resumes from); older ones are deleted.

Room. Before anything is written, with `new` the bytes of the checkpoint to save:
    after = in_use + new - replaced - pruned      bytes under the folder once the save and its pruning are done
    after > max_bytes                             -> 507, the budget (TRAINER_CHECKPOINT_MAX_BYTES) would be passed
    free - new < min_free_bytes                   -> 507, the disk would fill (TRAINER_CHECKPOINT_MIN_FREE_BYTES)
`replaced` is a checkpoint of the same name (its copy goes once the new one is in place), `pruned` what its series
sheds. The new copy is written before old ones go, so the disk needs `new` bytes free even when `after` fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TrainerError

_JOB_SERIES = re.compile(r"^(?P<series>.+)-step\d+$")
_OWN_SERIES = re.compile(r"^step-\d+$")
OWN_SERIES = "step"  # the series of saves without a name


class CheckpointRoomError(TrainerError):
    """The save was refused before writing anything (507): past the byte budget, or the disk would fill. The
    checkpoints already saved are as they were."""

    status = 507

    def __init__(self, message: str):
        super().__init__(message, field="name")


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int  # per series, >= 1
    max_bytes: int | None  # None: no budget, only the disk's room
    min_free_bytes: int


@dataclass(frozen=True)
class StoredCheckpoint:
    name: str
    created: float
    bytes: int


def series_of(name: str) -> str | None:
    """The series a checkpoint name belongs to, None for a named checkpoint."""
    if _OWN_SERIES.match(name):
        return OWN_SERIES
    match = _JOB_SERIES.match(name)
    return match.group("series") if match else None


def to_prune(stored: list[StoredCheckpoint], name: str, keep_last: int) -> list[StoredCheckpoint]:
    """What the series of `name` sheds once `name` is saved (it counts as the newest)."""
    series = series_of(name)
    if series is None:
        return []
    older = sorted(
        (c for c in stored if c.name != name and series_of(c.name) == series),
        key=lambda c: (c.created, c.name),
    )
    return older[: max(0, len(older) - (keep_last - 1))]


def plan_save(
    stored: list[StoredCheckpoint],
    in_use: int,
    free: int,
    name: str,
    new_bytes: int,
    policy: RetentionPolicy,
) -> list[StoredCheckpoint]:
    """The checkpoints to delete once `name` (`new_bytes`) is saved; raises CheckpointRoomError when there is no
    room for it. `in_use` counts everything under the folder (temporary copies of saves too), `free` the disk's
    free bytes."""
    pruned = to_prune(stored, name, policy.keep_last)
    replaced = sum(c.bytes for c in stored if c.name == name)
    after = in_use + new_bytes - replaced - sum(c.bytes for c in pruned)
    if policy.max_bytes is not None and after > policy.max_bytes:
        raise CheckpointRoomError(
            f"checkpoint {name}: saving {new_bytes:,} bytes would leave {after:,} bytes of checkpoints, over "
            f"the budget of {policy.max_bytes:,} (TRAINER_CHECKPOINT_MAX_BYTES; {len(stored)} checkpoints use "
            f"{in_use:,} bytes now). Delete some (DELETE /checkpoints/{{name}}) or raise the budget; nothing "
            "was written"
        )
    if free - new_bytes < policy.min_free_bytes:
        raise CheckpointRoomError(
            f"checkpoint {name}: saving {new_bytes:,} bytes would leave {max(free - new_bytes, 0):,} bytes free "
            f"on the disk, less than the {policy.min_free_bytes:,} kept free "
            "(TRAINER_CHECKPOINT_MIN_FREE_BYTES). Free some space or delete checkpoints; nothing was written"
        )
    return pruned
