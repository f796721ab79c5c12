"""The student's state: its adapter weights for checkpoints, on a tiny randomly initialised model."""

import pytest

torch = pytest.importorskip("torch")


def test_adapter_state_round_trip_refuses_foreign_tensors(student):
    state = student.adapter_state()
    with pytest.raises(ValueError, match="do not match"):
        student.load_adapter_state({"foreign": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        student.load_adapter_state({**state, key: torch.zeros(1)})
    student.load_adapter_state(state)
