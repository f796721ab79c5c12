"""Writes that survive a crash: a file's bytes and a directory's entries forced to disk before they count.

Checkpoints and exported adapters are both written into a temporary directory and renamed into place; a rename is
only durable once the directory holding it is synced, and the renamed files' bytes only once they were.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
