"""The engine process's sending side: a step's tokens go out as one message, and any error reaches the front end
as something it can unpickle."""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("torch")

from services.trainer.engine_process import batched, portable
from services.trainer.engine_wire import Reply, Tokens
from services.trainer.errors import InvalidRequest


def test_runs_of_tokens_become_one_message_and_the_order_is_kept():
    a, b, c = (1, 0, 11, None, None, 0), (2, 0, 12, None, None, 0), (1, 0, 13, None, None, 0)
    first, second = Reply(1, 0, result="one"), Reply(2, 0, result="two")
    assert batched([a, b, first, c, second]) == [Tokens([a, b]), first, Tokens([c]), second]
    assert batched([]) == []


class NeedsTwoArguments(Exception):
    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


def test_an_error_that_cannot_cross_becomes_a_runtime_error_naming_it():
    error = NeedsTwoArguments("x", "y")
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(error))  # pickles, but cannot be rebuilt on the other side
    crossed = portable(error)
    assert isinstance(crossed, RuntimeError) and str(crossed) == "NeedsTwoArguments: x: y"
    kept = InvalidRequest("n", "too many")
    assert portable(kept) is kept and portable(None) is None
