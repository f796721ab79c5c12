"""What each backend lets the Student do, and why a feature is off where it is.

loading.py loads the model and returns its Backend; the Student honours it and never sniffs the model for these.

transformers + peft (bitsandbytes 4-bit on CUDA): on CUDA the decoder layers are compiled (regional
torch.compile) and their activations checkpointed; generation decodes through plain copies with the adapter merged
in wherever the model allows it (decode_weights.py; not over 4-bit weights).

Unsloth (FastLanguageModel), as read from the source of the pinned release (docker/unsloth/):
- "base" and the KL reference: kept. peft's `disable_adapter()` still gives the base model: Unsloth's fused LoRA
  kernels read each layer's `disable_adapters` flag (kernels/utils.py, get_lora_parameters).
- the lm_head fused into the log-softmax (scoring.py): kept. The decoder stack called alone (causal_lm.model)
  returns the final-normed hidden states, and the lm_head stays frozen in bf16 (Unsloth trains the LoRA weights
  only), unless Unsloth added a token (a pad equal to eos with no spare token to use): then the head is trained,
  the Student's head check turns the fusion off, and the load logs it.
- regional compile: ours off. Unsloth compiles each decoder block itself in training mode
  (models/_block_compile.py, torch >= 2.11), around its own forwards and LoRA kernels; TRAINER_COMPILE_LAYERS=false
  turns that off too (UNSLOTH_BLOCK_COMPILE=0).
- gradient checkpointing: Unsloth's own (use_gradient_checkpointing="unsloth", activations offloaded to host
  memory) when TRAINER_GRADIENT_CHECKPOINTING is on; transformers' is not added on top.
- merged-weight decode copies: off. The base is 4-bit, and a plain copy would not be the patched model.
- generation: through transformers' own forwards. Unsloth's one-token decode step (its LlamaForCausalLM.forward)
  turns the cache into tuples and keeps per-layer KV buffers of its own, sized at the first step: it never fills
  the DynamicCache it is handed, and rows cannot leave or join, which the continuous decode loop (generation.py)
  needs at every step. Unsloth runs its patched forwards only on modules marked `_unsloth_fast_path`
  (models/llama.py, _gate_pre_patch_to_unsloth_models), so for the length of a generation call the marks are
  cleared and the causal LM runs transformers' forwards, with the same weights, peft LoRA layers (the MLP keeps
  Unsloth's fused LoRA kernel, which is exact) and rotary tables.
- 8-bit AdamW (bitsandbytes) and peft's adapter state dict for checkpoints: kept. The LoRA modules are peft's,
  with the same tensor names as under the transformers backend.
- a random-init model (config.json only): Unsloth loads weights only, so the transformers backend loads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

FAST_PATH_MARK = "_unsloth_fast_path"  # the attribute Unsloth gates its patched forwards on


class BackendUnavailable(RuntimeError):
    """The backend the settings name cannot run on this machine (no CUDA device, or the package is missing)."""


@contextlib.contextmanager
def through_peft_model(peft_model: Any) -> Iterator[Any]:
    """Generation calls the peft model as it is."""
    yield peft_model


@contextlib.contextmanager
def through_transformers_forwards(peft_model: Any) -> Iterator[Any]:
    """Generation calls the causal LM (LoRA layers in place) with Unsloth's patched forwards switched off."""
    causal_lm = peft_model.get_base_model()
    marked = [m for m in peft_model.modules() if getattr(m, FAST_PATH_MARK, False)]
    for module in marked:
        setattr(module, FAST_PATH_MARK, False)
    try:
        yield causal_lm
    finally:
        for module in marked:
            setattr(module, FAST_PATH_MARK, True)


@dataclass(frozen=True)
class Backend:
    """A loaded backend: its name, and what the Student may do with its model."""

    name: str  # "transformers" | "unsloth", as /health reports it
    compiled_layers: bool = (
        False  # decoder layers compiled for scoring and training; decoding runs them eagerly
    )
    merged_decode_off: str | None = (
        None  # why generation may not use merged plain copies; None: where possible
    )
    # (peft model) -> context yielding the model that generation calls
    decoding: Callable[[Any], contextlib.AbstractContextManager[Any]] = through_peft_model
    notes: tuple[str, ...] = ()  # what the backend turned off and why, logged at load


def transformers_backend(*, compiled_layers: bool) -> Backend:
    return Backend(name="transformers", compiled_layers=compiled_layers)


UNSLOTH_NOTES = (
    "regional compile is Unsloth's own: it compiles each decoder block when training (TRAINER_COMPILE_LAYERS)",
    "gradient checkpointing is Unsloth's own (activations offloaded to host memory)",
    "generation runs transformers' forwards: Unsloth's decode step keeps its own KV cache, which the continuous "
    "decode loop cannot grow, shrink or join",
)


def unsloth_backend() -> Backend:
    return Backend(
        name="unsloth",
        merged_decode_off="the unsloth backend (patched forwards over 4-bit weights)",
        decoding=through_transformers_forwards,
        notes=UNSLOTH_NOTES,
    )
