"""Every TrainerError crosses a process boundary (TRAINER_ENGINE_PROCESS) as itself: its class, message, status,
field and own attributes survive pickling, whatever its __init__ takes."""

from __future__ import annotations

import errno
import pickle

import pytest

pytest.importorskip("torch")

from services.trainer import adapter_export, checkpoint_retention, checkpoints
from services.trainer.errors import EngineStopped, InvalidRequest, NotFiniteStep, NotReady, TrainerError


def all_subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= all_subclasses(sub)
    return found


EXAMPLES = [
    TrainerError("plain", field="x", status=418),
    InvalidRequest("max_tokens", "too many", status=422),
    NotFiniteStep("the loss is nan"),
    NotReady("no weights"),
    NotReady(None),
    EngineStopped("it was killed by signal 9"),
    checkpoints.CheckpointNotFound("checkpoint 'a' not found"),
    checkpoints.CheckpointCorrupt("checkpoint a: bad hash"),
    checkpoints.CheckpointWriteError("a", OSError(errno.ENOSPC, "No space left on device")),
    checkpoint_retention.CheckpointRoomError("past the budget"),
    adapter_export.AdapterExportError(3, OSError(errno.EIO, "I/O error")),
]


def test_the_examples_cover_every_trainer_error():
    assert {type(error) for error in EXAMPLES} >= all_subclasses(TrainerError)


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda error: type(error).__name__)
def test_a_trainer_error_survives_pickling_with_its_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.message == error.message
    assert (copy.status, copy.field, copy.kind) == (error.status, error.field, error.kind)
    assert (
        copy.__dict__ == error.__dict__
    )  # InvalidRequest.why, NotReady.reason, CheckpointWriteError.errno, ...
