"""Atomic checkpoints of the trainer's state: adapter weights, optimizer state and a meta record.

Layout of <root>/<name>/:
    adapter.safetensors   LoRA tensors (peft state-dict names)
    optimizer.pt          torch.save of the optimizer's state_dict
    meta.json             {format, name, step, adapter_version, step_key, last_result, created, files: {file:
                          {bytes, sha256}}}
A checkpoint is written into a temporary sibling directory, every file fsynced, then renamed into place, so a
reader sees either the whole checkpoint or none. Loading checks sizes and hashes before anything is applied.

Retention (checkpoint_retention.py): `save_retained` checks the byte budget and the disk's room before writing
(507 when there is none) and afterwards deletes what the saved checkpoint's series sheds (the last K of each
series stay). A deletion renames the checkpoint aside (`.<name>.del-*`) before removing it, so it is never listed
half-deleted; `recover` removes what a crash left of one.

Crashes (kill -9) and full disks. A save that dies while writing leaves only a hidden `.<name>.tmp-*` directory,
which listing and loading ignore and the next process removes (`recover`; temporary directories carry a token of
the process writing them, so a live save is never touched). Replacing an existing checkpoint takes two renames
(the old one aside into `.<name>.old-*/<name>`, the new one into place); a crash between them leaves no
`<name>`, so listing and loading first move a complete aside copy back (`recover`). A write that fails (ENOSPC,
EFBIG under RLIMIT_FSIZE, EIO) raises CheckpointWriteError naming the cause; the previous checkpoint of that name
stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.protocol import CHECKPOINT_NAME

from .checkpoint_retention import RetentionPolicy, StoredCheckpoint, plan_save
from .durable_files import fsync_dir, write_synced
from .errors import InvalidRequest, TrainerError

if TYPE_CHECKING:  # torch loads where checkpoints are written or read (the engine), not where they are listed
    import torch

NAME_PATTERN = re.compile(CHECKPOINT_NAME)
FORMAT = "azt-trainer-checkpoint/1"
ADAPTER_FILE, OPTIMIZER_FILE, META_FILE = "adapter.safetensors", "optimizer.pt", "meta.json"
# Held across the two renames of a replacement, so `recover` in this process never mistakes a save in progress
# for one a crash interrupted.
_SWAP_LOCK = threading.Lock()
_PROCESS_TOKEN = uuid.uuid4().hex[:8]  # in the names of this process's temporary directories


class CheckpointNotFound(TrainerError, LookupError):
    """No checkpoint of that name (404)."""

    status = 404

    def __init__(self, message: str):
        super().__init__(message, field="name")


class CheckpointCorrupt(TrainerError, ValueError):
    """The checkpoint is incomplete, fails its hashes, or does not fit this model (409); nothing was applied."""

    status = 409

    def __init__(self, message: str):
        super().__init__(message, field="name")


class CheckpointWriteError(TrainerError, OSError):
    """Saving failed on the file system: 507 when the disk (or the file size limit) is full, else 500. The
    previous checkpoint of that name is intact."""

    def __init__(self, name: str, cause: OSError):
        self.out_of_space = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        why = "no space left (disk full or file size limit)" if self.out_of_space else "write failed"
        super().__init__(
            f"checkpoint {name}: {why}: {cause.strerror or cause} (errno {cause.errno})",
            field="name",
            status=507 if self.out_of_space else 500,
        )
        self.errno = cause.errno


@dataclass
class Checkpoint:
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    meta: dict[str, Any]


@dataclass
class Saved:
    path: Path
    bytes: int
    pruned: list[str]  # checkpoints of its series that retention deleted after it was saved


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or name in (".", ".."):
        raise InvalidRequest("name", f"{name!r} must match {NAME_PATTERN.pattern}", status=422)
    return name


def save_checkpoint(
    root: Path, name: str, adapter: dict[str, torch.Tensor], optimizer: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write the checkpoint atomically; an existing checkpoint of the same name is replaced as a whole."""
    check_name(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    blobs = _encode(adapter, optimizer)
    return _write_checked(root, name, blobs, _record(name, meta, blobs))


def save_retained(
    root: Path,
    name: str,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    meta: dict[str, Any],
    policy: RetentionPolicy,
) -> Saved:
    """Save as `save_checkpoint` does, within `policy`: refused before anything is written when the budget or the
    disk has no room for it (CheckpointRoomError, 507), and afterwards the older checkpoints of its series beyond
    the last `policy.keep_last` are deleted."""
    check_name(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    blobs = _encode(adapter, optimizer)
    record = _record(name, meta, blobs)
    new_bytes = sum(len(b) for b in blobs.values()) + len(json.dumps(record, indent=1)) + 256
    stored = [
        StoredCheckpoint(name=c["name"], created=c["created"] or 0.0, bytes=c["bytes"])
        for c in list_checkpoints(root)
    ]
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise CheckpointWriteError(name, exc) from exc
    pruned = plan_save(stored, folder_bytes(root), free, name, new_bytes, policy)
    path = _write_checked(root, name, blobs, record)
    for old in pruned:
        delete_checkpoint(root, old.name)
    return Saved(path=path, bytes=folder_bytes(path), pruned=[c.name for c in pruned])


def _encode(adapter: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> dict[str, bytes]:
    import torch
    from safetensors.torch import save as save_safetensors

    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    return {ADAPTER_FILE: save_safetensors(adapter), OPTIMIZER_FILE: buffer.getvalue()}


def _record(name: str, meta: dict[str, Any], blobs: dict[str, bytes]) -> dict[str, Any]:
    return {
        **meta,
        "format": FORMAT,
        "name": name,
        "created": time.time(),
        "files": {f: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for f, b in blobs.items()},
    }


def _write_checked(root: Path, name: str, blobs: dict[str, bytes], record: dict[str, Any]) -> Path:
    try:
        return _write(root, name, blobs, record)
    except CheckpointWriteError:
        raise
    except OSError as exc:
        raise CheckpointWriteError(name, exc) from exc


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path` (files that vanish meanwhile, a save's or a deletion's, count 0)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, file)).st_size
    return total


def delete_checkpoint(root: Path, name: str) -> int:
    """Delete a checkpoint; returns the bytes freed. Renamed aside first, so it is listed whole or not at all."""
    check_name(name)
    root = Path(root)
    path = root / name
    with _SWAP_LOCK:
        if not path.is_dir():
            raise CheckpointNotFound(f"checkpoint {name!r} not found in {root}")
        freed = folder_bytes(path)
        aside = Path(tempfile.mkdtemp(prefix=f".{name}.del-", dir=root))
        os.replace(path, aside / name)
    shutil.rmtree(aside, ignore_errors=True)
    return freed


def _write(root: Path, name: str, blobs: dict[str, bytes], record: dict[str, Any]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{_PROCESS_TOKEN}-", dir=root))
    try:
        for file, blob in blobs.items():
            write_synced(tmp / file, blob)
        write_synced(tmp / META_FILE, json.dumps(record, indent=1).encode())
        fsync_dir(tmp)
        target = root / name
        with _SWAP_LOCK:
            if target.exists():  # rename the old one aside first so the swap itself is one rename
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
                os.replace(target, old / name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError as exc:
        raise CheckpointCorrupt(
            f"checkpoint {path.name}: {META_FILE} is missing (partial checkpoint)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise CheckpointCorrupt(f"checkpoint {path.name}: {META_FILE} is unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise CheckpointCorrupt(f"checkpoint {path.name}: {META_FILE} is not a {FORMAT} record")
    return meta


def recover(root: Path) -> list[str]:
    """Move back checkpoints a crash left aside while being replaced (`.<name>.old-*/<name>` with no `<name>`)
    and remove the temporary directories of saves that died; returns the names moved back. Only complete copies
    (a readable meta record) come back."""
    root = Path(root)
    restored: list[str] = []
    if not root.is_dir():
        return restored
    with _SWAP_LOCK:
        for aside in sorted(root.glob(".*.old-*")):
            _restore(root, aside, restored)
        for tmp in root.glob(".*.tmp-*"):
            if f".tmp-{_PROCESS_TOKEN}-" not in tmp.name:  # another (dead) process's unfinished save
                shutil.rmtree(tmp, ignore_errors=True)
        for deleted in root.glob(".*.del-*"):  # a deletion a crash interrupted (not a live save of a name
            if f".tmp-{_PROCESS_TOKEN}-" not in deleted.name:  # that happens to hold ".del-")
                shutil.rmtree(deleted, ignore_errors=True)
    return restored


def _restore(root: Path, aside: Path, restored: list[str]) -> None:
    name = aside.name[1:].rsplit(".old-", 1)[0]
    copy = aside / name
    if not NAME_PATTERN.match(name) or not copy.is_dir():
        return
    if not (root / name).exists():
        try:
            read_meta(copy)
        except CheckpointCorrupt:
            return
        os.replace(copy, root / name)
        fsync_dir(root)
        restored.append(name)
    shutil.rmtree(aside, ignore_errors=True)


def load_checkpoint(root: Path, name: str) -> Checkpoint:
    """Read and verify a checkpoint completely; raises CheckpointNotFound or CheckpointCorrupt."""
    check_name(name)
    path = Path(root) / name
    if not path.is_dir():
        recover(root)
    if not path.is_dir():
        raise CheckpointNotFound(f"checkpoint {name!r} not found in {root}")
    meta = read_meta(path)
    blobs = {}
    for file in (ADAPTER_FILE, OPTIMIZER_FILE):
        expected = meta["files"].get(file)
        try:
            blob = (path / file).read_bytes()
        except OSError as exc:
            raise CheckpointCorrupt(f"checkpoint {name}: {file} is missing or unreadable") from exc
        if not expected or len(blob) != expected.get("bytes"):
            raise CheckpointCorrupt(
                f"checkpoint {name}: {file} has {len(blob)} bytes, expected "
                f"{(expected or {}).get('bytes')} (truncated or partial)"
            )
        if hashlib.sha256(blob).hexdigest() != expected.get("sha256"):
            raise CheckpointCorrupt(f"checkpoint {name}: {file} does not match its recorded sha256")
        blobs[file] = blob
    import torch
    from safetensors.torch import load as load_safetensors

    try:
        adapter = load_safetensors(blobs[ADAPTER_FILE])
        optimizer = torch.load(io.BytesIO(blobs[OPTIMIZER_FILE]), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointCorrupt(f"checkpoint {name}: cannot decode: {exc}") from exc
    return Checkpoint(adapter=adapter, optimizer=optimizer, meta=meta)


def list_checkpoints(root: Path) -> list[dict[str, Any]]:
    """Complete checkpoints under root (temporary and unreadable directories are left out), oldest first."""
    root = Path(root)
    found = []
    recover(root)
    if root.is_dir():
        for path in root.iterdir():
            if not path.is_dir() or not NAME_PATTERN.match(path.name):
                continue
            try:
                meta = read_meta(path)
            except CheckpointCorrupt:
                continue
            found.append(
                {
                    "name": path.name,
                    "step": meta.get("step"),
                    "adapter_version": meta.get("adapter_version"),
                    "created": meta.get("created"),
                    "bytes": folder_bytes(path),
                }
            )
    return sorted(found, key=lambda c: (c["created"] or 0, c["name"]))
