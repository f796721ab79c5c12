import re

from orchestrator.runners.checkpoints import checkpoint_due, checkpoint_name


def test_checkpoint_names_are_valid_trainer_names():
    name = checkpoint_name("train-0123456789ab", 12)
    assert name == "train-0123456789ab-step000012"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name)


def test_checkpoints_are_due_every_n_steps_and_after_the_last():
    assert [s for s in range(1, 8) if checkpoint_due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 4) if checkpoint_due(s, 1, 3)] == [1, 2, 3]
