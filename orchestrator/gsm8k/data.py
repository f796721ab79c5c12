"""GSM8K problems: loading (local jsonl folder or the hub) and the chat prompt that asks for a solution.

Record schema {prompt, answer, info}: `prompt` is the question, `answer` the gold final number (canonical
string from the `#### N` line), `info` keeps the split, the row index and the full gold solution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.gsm8k.answers import extract_strict

GSM8K_INSTRUCTION = "Solve step by step. End with a line '#### <number>'."
HUB_DATASET = ("openai/gsm8k", "main")


@dataclass(frozen=True)
class Problem:
    id: str  # "<split>-<index>", e.g. "test-17"
    prompt: str  # the question text
    answer: str  # the gold final number, canonical ("1000", "0.5")
    info: dict = field(default_factory=dict, hash=False, compare=False)  # split, index, solution

    def to_record(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer, "info": dict(self.info)}


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


def _rows_from_folder(folder: Path, split: str) -> list[dict]:
    file = folder / f"{split}.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"GSM8K split {split!r} not found: {file} does not exist")
    with file.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _rows_from_hub(split: str) -> list[dict]:
    try:
        import datasets  # pyright: ignore[reportMissingImports]  # optional: only where a hub is reachable
    except ImportError as exc:
        raise RuntimeError(
            "GSM8K: no local path given (argument `path` or GSM8K_PATH) and the `datasets` package is not "
            "installed; either `pip install datasets` or point GSM8K_PATH at a folder with {train,test}.jsonl"
        ) from exc
    return [dict(r) for r in datasets.load_dataset(*HUB_DATASET, split=split)]


def load_gsm8k(
    split: str = "test", path: str | None = None, limit: int | None = None, offset: int = 0
) -> list[Problem]:
    """Problems `offset .. offset+limit` of a split.

    `path` is a folder with `{split}.jsonl` (fields `question`, `answer`); None falls back to the GSM8K_PATH
    environment variable and then to the hub (openai/gsm8k "main").
    """
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', not {split!r}")
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError("offset and limit must be >= 0")
    folder = path or os.environ.get("GSM8K_PATH") or None
    rows = _rows_from_folder(Path(folder), split) if folder else _rows_from_hub(split)
    end = len(rows) if limit is None else min(len(rows), offset + limit)
    return [_problem(split, i, rows[i]) for i in range(offset, end)]
