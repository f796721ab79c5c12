"""Checkpoint request validation: names cannot leave the checkpoint folder."""

import pytest
from pydantic import ValidationError

from services.protocol import SaveCheckpointRequest


def test_checkpoint_names_cannot_escape():
    with pytest.raises(ValidationError):
        SaveCheckpointRequest(name="../x")
    assert SaveCheckpointRequest().name is None
