"""The units of work the student takes and gives back, in token ids (no text rendering, no HTTP)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InvalidRequest

# (sample index, token id, its log-prob, its top alternatives): called on the worker thread as each token of a
# request is decoded, before the decoder looks at whether it ends the sample. The log-prob is None unless the
# request asked for log-probs, the alternatives unless it asked for some.
OnToken = Callable[[int, int, float | None, list[tuple[int, float]] | None], None]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no log-probs; k >= 0: the sampled token's plus the top k alternatives
    on_token: OnToken | None = None  # streaming (services/trainer/streaming.py)


@dataclass
class Sample:
    token_ids: list[int]  # the generated ids behind `text` (an end-of-sequence token is not included)
    text: str
    finish_reason: str  # "stop" | "length"
    num_generated: int  # tokens produced, including a final end-of-sequence token
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # As vLLM reports it: the stop string that ended the sample; None for end of sequence or the length cap.
    stop_reason: str | None = None


@dataclass
class DecodedRow:
    """A finished sample as a decode loop leaves it, in ids: generation.finish_sample turns it into a Sample (its
    text, cut at the stop string). The engine process (TRAINER_ENGINE_PROCESS) sends these back, so that the HTTP
    process detokenizes and the decode thread does not."""

    token_ids: list[int]  # every generated id, a final end-of-sequence token included
    logprobs: list[float]  # per id, where the request asked for log-probs (else empty)
    tops: list[list[tuple[int, float]]]  # per id, its top alternatives, where the request asked for some
    finish_reason: str  # "stop" | "length"
    stop_cut: int | None  # where a stop string starts in the text, when one ended the sample


Finished = (
    Sample | DecodedRow
)  # what a generation gives per sample: a Sample, or a DecodedRow (Student.detokenize)


@dataclass
class ScoreItem:
    context_ids: list[int]  # conditioning only
    completion_ids: list[int]  # scored


@dataclass
class GrpoItem:
    context_ids: list[int]
    completion_ids: list[int]
    advantage: float
    old_logprobs: list[float] | None = None
    weight: float = 1.0
    sampler_logprobs: list[float] | None = None  # the behaviour policy (another server's sampling)
    # Items of one group (one prompt's answers) go into the same mini-batch of a step of several updates where
    # the cut allows; None: a group of its own.
    group: int | None = None


@dataclass
class UpdateResult:
    """One optimizer step of a GRPO step: its mini-batch's loss (normalised by its own item count), gradient
    norm before clipping, and clip fraction."""

    items: int
    tokens: int
    loss: float
    grad_norm: float
    clip_fraction: float


@dataclass
class StepResult:
    loss: float
    kl: float
    clip_fraction: float
    grad_norm: float
    tokens: int
    adapter_version: int
    step: int
    is_weight_mean: float = 1.0
    is_truncated_fraction: float = 0.0
    micro_batches: int = 0
    updates: int = 1
    per_update: list[UpdateResult] = field(default_factory=list)


def check_grpo_items(items: list[GrpoItem]) -> None:
    """Raise InvalidRequest naming the first item field the step cannot use (token-level checks the request
    model cannot make: an empty tokenisation, old log-probs of the wrong length)."""
    if not items:
        raise InvalidRequest("items", "at least one item is required")
    for i, it in enumerate(items):
        if not it.completion_ids:
            raise InvalidRequest(f"items[{i}].completion", "must contain at least one token")
        if not math.isfinite(it.advantage):
            raise InvalidRequest(f"items[{i}].advantage", "must be finite")
        if not math.isfinite(it.weight):
            raise InvalidRequest(f"items[{i}].weight", "must be finite")
        for name in ("old_logprobs", "sampler_logprobs"):
            values = getattr(it, name)
            if values is None:
                continue
            if len(values) != len(it.completion_ids):
                raise InvalidRequest(
                    f"items[{i}].{name}",
                    f"{len(values)} values for {len(it.completion_ids)} completion tokens",
                )
            if not all(math.isfinite(x) for x in values):
                raise InvalidRequest(f"items[{i}].{name}", "must be finite")
