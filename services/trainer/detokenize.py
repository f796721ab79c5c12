"""A finished row in ids (a DecodedRow) made into the Sample a request gets: its text, cut where a stop string
begins, and the log-probs the request asked for. Torch-free: it runs wherever the text is wanted, on the decode
thread in process, or in the HTTP process where the engine has a process of its own (remote_core.py)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .items import DecodedRow, GenerationRequest, Sample


def finish_sample(
    tokenizer: Any, eos_ids: Collection[int], request: GenerationRequest, row: DecodedRow
) -> Sample:
    """The Sample of a finished row: its text cut at the stop string, and what the request asked to see."""
    ids, finish_reason, stop_cut = row.token_ids, row.finish_reason, row.stop_cut
    num_generated = len(ids)
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stop_reason = None
    if stop_cut is not None:
        stop_reason = next((stop for stop in request.stop if text.startswith(stop, stop_cut)), None)
        text = text[:stop_cut]
        # The last token completed the stop string; keep it only if text it carries precedes the stop.
        if ids and tokenizer.decode(ids[:-1], skip_special_tokens=True) == text:
            ids = ids[:-1]
    sample = Sample(
        token_ids=ids,
        text=text,
        finish_reason=finish_reason,
        num_generated=num_generated,
        stop_reason=stop_reason,
    )
    if request.logprobs is not None:
        sample.token_logprobs = row.logprobs[: len(ids)]
        sample.top_logprobs = row.tops[: len(ids)] if request.logprobs else None
    return sample
