"""GSM8K problems: where they come from, and the chat prompt that asks for a solution.

Loading order (`read_split`): a folder the caller names (argument `path`, else GSM8K_PATH); else the hub through
`datasets` (openai/gsm8k, config "main") when the hub answers within a few seconds; else the copy shipped inside
this package (orchestrator/gsm8k/dataset/, MIT, the same rows). The hub's reachability is decided once per process,
never waits longer than the probe's deadline, and is skipped when HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set.
Every split says which source it came from (`Gsm8kSplit.source`), so jobs can record it.

Record schema {prompt, answer, info}: `prompt` is the question, `answer` the gold final number (canonical
string from the `#### N` line), `info` keeps the split, the row index and the full gold solution.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import IO, Any, Literal

from orchestrator.gsm8k.answers import extract_strict

log = logging.getLogger(__name__)

GSM8K_INSTRUCTION = "Solve step by step. End with a line '#### <number>'."
HUB_DATASET = "openai/gsm8k"
HUB_CONFIG = "main"
SPLITS = ("train", "test")
# Long enough for a slow but working connection to answer one small API call, short enough that a machine with no
# route to the hub starts its first job at once.
HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub and datasets read their boolean variables


@dataclass(frozen=True)
class Problem:
    id: str  # "<split>-<index>", e.g. "test-17"
    prompt: str  # the question text
    answer: str  # the gold final number, canonical ("1000", "0.5")
    info: dict = field(default_factory=dict, hash=False, compare=False)  # split, index, solution

    def to_record(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer, "info": dict(self.info)}


@dataclass(frozen=True)
class Gsm8kSource:
    """Where a split's rows came from, and why that source was chosen."""

    kind: Literal["path", "hub", "shipped"]
    location: str  # the folder, the hub dataset, or the shipped folder
    reason: str

    def to_record(self) -> dict[str, str]:
        return {"source": self.kind, "location": self.location, "reason": self.reason}


@dataclass(frozen=True)
class Gsm8kSplit:
    """One split's rows ({question, answer}) and their source."""

    name: str
    rows: tuple[dict[str, Any], ...]
    source: Gsm8kSource

    def problems(self, limit: int | None = None, offset: int = 0) -> list[Problem]:
        """Problems `offset .. offset+limit` (fewer past the end)."""
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("offset and limit must be >= 0")
        end = len(self.rows) if limit is None else min(len(self.rows), offset + limit)
        return [_problem(self.name, i, self.rows[i]) for i in range(offset, end)]


def question_messages(problem: Problem | str) -> list[dict]:
    """The one chat prompt used for the student, teachers' context and eval."""
    question = problem.prompt if isinstance(problem, Problem) else problem
    return [{"role": "user", "content": f"{question.strip()}\n{GSM8K_INSTRUCTION}"}]


def _problem(split: str, index: int, row: dict) -> Problem:
    solution = row["answer"]
    gold = extract_strict(solution)
    if gold is None:
        raise ValueError(f"GSM8K {split} row {index} has no '#### N' answer line")
    return Problem(
        id=f"{split}-{index}",
        prompt=row["question"],
        answer=gold,
        info={"split": split, "index": index, "solution": solution},
    )


# ----- the three sources ------------------------------------------------------------------------------------
def _jsonl_rows(lines: Iterable[str]) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(line) for line in lines if line.strip())


def _read_jsonl(fh: IO[bytes], gzipped: bool) -> tuple[dict[str, Any], ...]:
    if gzipped:
        with gzip.open(fh, "rt", encoding="utf-8") as text:
            return _jsonl_rows(text)
    return _jsonl_rows(line.decode("utf-8") for line in fh)


def rows_from_folder(folder: Path, split: str) -> tuple[dict[str, Any], ...]:
    """`{split}.jsonl` (or `{split}.jsonl.gz`) of a folder, one {question, answer} object a line."""
    for name, gzipped in ((f"{split}.jsonl", False), (f"{split}.jsonl.gz", True)):
        if (folder / name).is_file():
            with (folder / name).open("rb") as fh:
                return _read_jsonl(fh, gzipped)
    raise FileNotFoundError(
        f"GSM8K split {split!r} not found: {folder / f'{split}.jsonl'} (or .jsonl.gz) does not exist"
    )


def _shipped_dataset() -> Traversable:
    return resources.files("orchestrator.gsm8k").joinpath("dataset")


def shipped_location() -> str:
    return str(_shipped_dataset())


@functools.cache
def shipped_rows(split: str) -> tuple[dict[str, Any], ...]:
    """The copy inside the package (gzipped JSONL; package data of the wheel and the orchestrator image)."""
    with _shipped_dataset().joinpath(f"{split}.jsonl.gz").open("rb") as fh:
        return _read_jsonl(fh, gzipped=True)


@functools.cache
def hub_rows(
    split: str, repo: str = HUB_DATASET, config: str = HUB_CONFIG, cache_dir: str | None = None
) -> tuple[dict[str, Any], ...]:
    """A split through `datasets.load_dataset(repo, config)`: the hub's dataset, or a local folder laid out as the
    hub's repository (README.md with `configs`, parquet files), which is how it is tested here. Kept per process."""
    import datasets  # heavy (pyarrow, pandas): imported only when the hub is used

    dataset = datasets.load_dataset(repo, config, split=split, cache_dir=cache_dir)
    return tuple(dataset.to_list())  # pyright: ignore[reportAttributeAccessIssue]  # a Dataset for one split


# ----- is the hub there? ---------------------------------------------------------------------------------------
def hub_offline() -> str | None:
    """The variable that puts the hub out of bounds (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), read when asked."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return name
    return None


@functools.cache
def probe_hub(
    repo: str = HUB_DATASET, endpoint: str | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S
) -> str | None:
    """None when the hub answered for `repo` within `timeout_s`, else why not. Asked once per process and endpoint.

    The call runs on a daemon thread that is abandoned at the deadline, since a name lookup can outlast an HTTP
    client's own timeout and nothing may wait on an unreachable hub."""
    answer: list[str | None] = []

    def ask() -> None:
        try:
            from huggingface_hub import HfApi

            HfApi(endpoint=endpoint).dataset_info(repo, timeout=timeout_s)
            answer.append(None)
        except Exception as exc:  # any failure means "not usable from here"; its kind goes into the reason
            answer.append(f"{type(exc).__name__} from the hub")

    thread = threading.Thread(target=ask, name="gsm8k-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return answer[0] if answer else f"no answer from the hub within {timeout_s:g}s"


def _hub_unusable() -> str | None:
    if variable := hub_offline():
        return f"{variable} is set"
    if importlib.util.find_spec("datasets") is None:
        return "the `datasets` package is not installed"
    return probe_hub()


# ----- the loading order ---------------------------------------------------------------------------------------
def read_split(split: str, path: str | Path | None = None) -> Gsm8kSplit:
    """One split from the first source that has it: `path` (else GSM8K_PATH), the hub, the shipped copy."""
    if split not in SPLITS:
        raise ValueError(f"GSM8K split must be 'train' or 'test', not {split!r}")
    data = _first_source(split, path)
    source = data.source
    log.info(
        "GSM8K %s: %d rows from %s %s (%s)",
        split,
        len(data.rows),
        source.kind,
        source.location,
        source.reason,
    )
    return data


def _first_source(split: str, path: str | Path | None) -> Gsm8kSplit:
    folder = path or os.environ.get("GSM8K_PATH") or None
    if folder:
        reason = "named by the caller" if path else "GSM8K_PATH"
        return Gsm8kSplit(
            split, rows_from_folder(Path(folder), split), Gsm8kSource("path", str(folder), reason)
        )
    if (why_not := _hub_unusable()) is None:
        try:
            source = Gsm8kSource("hub", f"{HUB_DATASET} ({HUB_CONFIG})", "the hub answered")
            return Gsm8kSplit(split, hub_rows(split), source)
        except (
            Exception
        ) as exc:  # the same rows are shipped: a failed download is not worth failing a job for
            why_not = f"loading from the hub failed ({type(exc).__name__})"
            log.warning("GSM8K: %s; using the shipped copy", why_not, exc_info=True)
    return Gsm8kSplit(
        split, shipped_rows(split), Gsm8kSource("shipped", shipped_location(), f"hub not used: {why_not}")
    )


def load_gsm8k(
    split: str = "test", path: str | Path | None = None, limit: int | None = None, offset: int = 0
) -> list[Problem]:
    """Problems `offset .. offset+limit` of a split, from the first source that has it (see `read_split`)."""
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError("offset and limit must be >= 0")
    return read_split(split, path).problems(limit, offset)
