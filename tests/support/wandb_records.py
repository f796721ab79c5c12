"""The records of an offline Weights & Biases run (its `run-<id>.wandb` file), read with wandb's own protobuf
messages. wandb ships no Python reader for the file any more (its Go core writes and syncs it), so the framing is
read here: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then LevelDB-log blocks of 32 KiB whose
records carry a CRC-32 (seeded with the record type), a length, a type (full, first, middle, last) and their bytes.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # both the file's header and each record's
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every record of the file, in order, as wandb_internal_pb2.Record."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path) -> dict[int, dict[str, Any]]:
    """The logged rows by step: {step: {metric name: value}} (wandb's own `_step`, `_runtime`, ... included)."""
    rows = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows[record.history.step.num] = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items
            }
    return rows


def run_info(path: Path) -> Any:
    """The run record (project, run_id, display_name, config)."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
