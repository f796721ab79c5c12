"""The messages between the trainer's HTTP process and its engine process (TRAINER_ENGINE_PROCESS), one definition
for both sides. They travel pickled over one duplex multiprocessing Pipe: the front end sends one message per
`send`, the engine a list of every message that was ready (a decode step's tokens of all streams, the replies of
the requests it finished), so a step costs one write, not one per token or request.

    front end -> engine:  Call, Cancel, Stop
    engine -> front end:  Ready or LoadFailed (once, when the model has loaded or failed to), then Tokens and Reply

A Call and its Reply carry time.monotonic() stamps of each hop (one clock for every process on a machine), from
which the front end adds up where a request's time went (remote_core.WireTimes: /health's `service.engine_hops`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .core import CoreFacts

# One streamed token: request id, sample index, token id, its log-prob, its top alternatives, adapter version.
TokenEvent = tuple[int, int, int, float | None, list[tuple[int, float]] | None, int]


@dataclass
class Call:
    id: int
    op: str  # one of core.py's operations (GENERATE, SCORE, GRPO_STEP, SAVE, LOAD, DELETE, STATS)
    payload: Any
    rows: int = 1
    stream: bool = False  # a generation whose tokens are sent back as they are decoded (Tokens)
    sent_at: float = 0.0  # when the front end wrote it to the pipe


@dataclass
class Cancel:
    """The caller went away: drop the request if it has not started."""

    id: int


@dataclass
class Stop:
    """Close the engine and exit."""


@dataclass
class Ready:
    facts: CoreFacts
    tokenizer: Any  # the student's tokenizer (HF fast tokenizers pickle), for rendering and encoding requests
    adapter_version: int


@dataclass
class LoadFailed:
    error: str  # as /health reports it


@dataclass
class Reply:
    id: int
    adapter_version: int  # the student's adapter version when the reply was sent
    result: Any = None
    error: BaseException | None = None  # a TrainerError keeps its class, status and field (errors.py)
    read_at: float = 0.0  # when the engine process read its Call off the pipe
    answered_at: float = 0.0  # when the engine core answered it (queue wait and decode done)
    sent_at: float = 0.0  # when the engine process wrote this Reply to the pipe


@dataclass
class Tokens:
    events: list[TokenEvent]
