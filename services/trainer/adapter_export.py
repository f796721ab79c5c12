"""The adapter of every version as a PEFT directory, for a student server that loads LoRA adapters at runtime
(vLLM's /v1/load_lora_adapter; docs/vllm-student.md). On when TRAINER_ADAPTER_EXPORT_DIR is set.

Layout of <root>/v<version, 6 digits>-<8 hex>/:
    adapter_config.json         peft's LoraConfig (inference_mode true), as PeftModel.save_pretrained writes it
    adapter_model.safetensors   the LoRA tensors under peft's state-dict names
Both vLLM and peft's PeftModel.from_pretrained read it. The 8 hex digits are a hash of both files: a version
number comes back after a checkpoint load, and vLLM keys its prefix cache (and a client its loaded adapters) by
path, so one path never names two different adapters, and the same adapter written twice lands on the same path.

A version is written into a hidden temporary sibling, every file fsynced, then renamed into place, so the
student server sees a whole adapter or none. The newest TRAINER_ADAPTER_EXPORT_KEEP directories stay (by the
time they were last written); older ones are deleted, and so are temporary directories a crash left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .durable_files import fsync_dir, write_synced
from .errors import TrainerError

if TYPE_CHECKING:
    import torch

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
DIR_PATTERN = re.compile(r"^v(\d{6,})-[0-9a-f]{8}$")
TMP_PREFIX = ".export-tmp-"


class AdapterExportError(TrainerError, OSError):
    """Writing the adapter failed on the file system: 507 when the disk is full, else 500. The step or load that
    came before it has been applied; a retry of the same step_key writes the adapter again."""

    def __init__(self, version: int, cause: OSError):
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        why = "no space left" if full else "write failed"
        super().__init__(
            f"adapter version {version}: export to TRAINER_ADAPTER_EXPORT_DIR failed: {why}: "
            f"{cause.strerror or cause} (errno {cause.errno})",
            status=507 if full else 500,
        )


def peft_config_json(config: Any) -> bytes:
    """A peft LoraConfig as adapter_config.json, deterministic (sets sorted, keys sorted), for inference."""
    record = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    record["inference_mode"] = True
    return json.dumps(record, indent=2, sort_keys=True).encode()


class AdapterExporter:
    def __init__(self, root: Path, keep: int):
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(TMP_PREFIX + "*"):  # a previous process died while writing
            shutil.rmtree(stale, ignore_errors=True)

    def export(self, version: int, state: dict[str, torch.Tensor], config: Any) -> Path:
        """Write `state` (peft state-dict names) with `config` as version `version`; returns its directory."""
        from safetensors.torch import save as save_safetensors  # in the engine's process only

        weights = save_safetensors(state, metadata={"format": "pt"})
        config_json = peft_config_json(config)
        digest = hashlib.sha256(config_json + weights).hexdigest()[:8]
        target = self.root / f"v{version:06d}-{digest}"
        try:
            if (
                target.is_dir()
            ):  # the same adapter again (e.g. reloaded from a checkpoint): only mark it newest
                os.utime(target)
            else:
                self._write(target, {CONFIG_FILE: config_json, WEIGHTS_FILE: weights})
            self._prune(keep=target)
        except OSError as exc:
            raise AdapterExportError(version, exc) from exc
        return target

    def exported(self) -> list[Path]:
        """The complete version directories, oldest first."""
        found = [p for p in self.root.iterdir() if p.is_dir() and DIR_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns)

    def _write(self, target: Path, files: dict[str, bytes]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            for name, blob in files.items():
                write_synced(tmp / name, blob)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: the student server may run as another user
            fsync_dir(tmp)
            os.replace(tmp, target)
            os.utime(target)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _prune(self, keep: Path) -> None:
        exported = [p for p in self.exported() if p != keep]
        for old in exported[: max(len(exported) - (self.keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
