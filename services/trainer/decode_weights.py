"""Plain (peft-free) copies of the causal LM for generation, with the LoRA adapter merged into their weights.

Why: a decode step is all Python and kernel-launch overhead at the trainer's batch sizes. peft's LoRA wrappers add
about half the kernel launches of a pass (H100, SmolLM2-135M bf16, r=32 on all 7 projections: ~55 ms per decode
forward with the adapter, ~35 ms with it disabled, at batch 1 to 256). Decoding through a plain model whose target
weights are W0 + scaling * B @ A removes that cost; scoring and training stay on the peft model.

Two plain models share every tensor of the peft model's base (embeddings, norms, lm_head, rotary buffers, the
non-target weights):
- "base" (adapter off) also shares the target weights W0: it costs no weight memory and never needs a sync;
- "student" (adapter on) owns its target weights, rewritten by `sync` whenever the adapter changed. That is the
  extra memory: one more copy of the target linears (SmolLM2-135M in float32 on CPU: ~110M parameters, ~440 MB;
  a bf16 3B model on CUDA: ~2.6B parameters, ~5 GiB).
Keeping base apart (rather than one copy rewritten to W0 for base) means alternating base and student batches,
as evaluations do, costs no rewrites.

With TRAINER_DECODE_DTYPE=bfloat16 on a float32 model (CPUs with bf16 matrix instructions) the copies share bf16
casts of those tensors instead, each cast once: one more bf16 copy of the whole model besides the student's targets.
"""

from __future__ import annotations

import copy
import logging
from typing import cast

import torch

log = logging.getLogger(__name__)

ADAPTER = "default"  # the one adapter the trainer attaches (peft's default name)


def merge_blocker(peft_model) -> str | None:
    """Why this model's adapter cannot be merged into plain weights, or None when it can. With the backend's own
    verdict (backends.Backend.merged_decode_off), it decides whether generation uses the plain models."""
    from peft.tuners.lora import LoraLayer

    causal_lm = peft_model.get_base_model()
    if getattr(causal_lm, "quantization_config", None) is not None:
        # bitsandbytes 4-bit weights are packed: W0 + B @ A would have to be re-quantised on every sync, which
        # loses the adapter's small update in the rounding.
        return "a quantised (bitsandbytes) base model"
    lora_layers = [m for m in causal_lm.modules() if isinstance(m, LoraLayer)]
    if not lora_layers:
        return "no LoRA layers"
    for module in lora_layers:
        if type(module.get_base_layer()) is not torch.nn.Linear:  # exact type: bnb's Linear4bit subclasses it
            return f"a LoRA target of type {type(module.get_base_layer()).__name__}"
        if ADAPTER not in module.lora_A or module.use_dora.get(ADAPTER, False):
            return "an adapter other than one plain LoRA named 'default'"
        if getattr(module.lora_B[ADAPTER], "bias", None) is not None or getattr(
            module, "fan_in_fan_out", False
        ):
            return "a LoRA with a bias or fan_in_fan_out"
    return None


class MergedDecoder:
    """Owns the plain base and student models; `model(enabled, adapter_version)` returns the one to decode with."""

    def __init__(self, peft_model, dtype: torch.dtype | None = None):
        """dtype: the copies' floating-point weights in this dtype (cast once, shared by both copies); None = the
        model's own tensors, shared without a copy."""
        from peft.tuners.lora import LoraLayer

        causal_lm = peft_model.get_base_model()
        # (path, peft LoRA module) for every target linear, e.g. ("model.layers.0.self_attn.q_proj", LoraLayer)
        self.targets = [(n, m) for n, m in causal_lm.named_modules() if isinstance(m, LoraLayer)]
        cast = _Cast(None if dtype == causal_lm.dtype else dtype)
        self.base = _plain_copy(causal_lm, self.targets, own_targets=False, cast=cast)
        self.student = _plain_copy(causal_lm, self.targets, own_targets=True, cast=cast)
        self._student_weights = [
            self.student.get_submodule(name).weight for name, _ in self.targets
        ]  # the tensors `sync` rewrites
        self._synced_version: int | None = None  # adapter_version the student weights hold; None = stale
        self.epoch = 0  # +1 whenever the student's weights are rewritten (what it computed before is stale)

    def invalidate(self) -> None:
        """The adapter changed without a new adapter_version (a checkpoint was loaded): merge again on next use."""
        self._synced_version = None

    def model(self, enabled: bool, adapter_version: int):
        """The plain model for the adapter on (student, synced to adapter_version first) or off (base)."""
        if not enabled:
            return self.base
        self.sync(adapter_version)
        return self.student

    @torch.no_grad()
    def sync(self, adapter_version: int) -> None:
        """Rewrite the student's target weights to W0 + scaling * B @ A unless they already hold this version.
        The sum is formed in float32 and cast once to the weights' dtype (bf16 on CUDA)."""
        if self._synced_version == adapter_version:
            return
        for (_, module), weight in zip(self.targets, self._student_weights, strict=True):
            w0 = module.get_base_layer().weight
            lora_b = cast(torch.Tensor, module.lora_B[ADAPTER].weight)
            lora_a = cast(torch.Tensor, module.lora_A[ADAPTER].weight)
            delta = lora_b.float() @ lora_a.float()
            weight.copy_((w0.float() + module.scaling[ADAPTER] * delta).to(weight.dtype))
        self._synced_version = adapter_version
        self.epoch += 1


class _Cast:
    """Floating-point parameters in another dtype, each cast once: both plain copies and tied names then share the
    cast tensor as they would share the original. dtype None = the original tensors themselves."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self._done: dict[int, torch.Tensor] = {}

    def __call__(self, tensor: torch.Tensor, *, buffer: bool) -> torch.Tensor:
        # Buffers (rotary frequencies) keep their dtype, as transformers keeps them in float32 under bf16 weights.
        if self.dtype is None or buffer or not tensor.is_floating_point():
            return tensor
        if id(tensor) not in self._done:
            self._done[id(tensor)] = torch.nn.Parameter(tensor.detach().to(self.dtype), requires_grad=False)
        return self._done[id(tensor)]


def _plain_copy(causal_lm, targets, *, own_targets: bool, cast: _Cast):
    """A plain model of causal_lm's class and config whose parameters and buffers are causal_lm's own tensors (or
    their casts); with own_targets, each LoRA target's weight is a fresh copy of W0 instead of W0 itself."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory: every tensor is replaced below
        plain = AutoModelForCausalLM.from_config(
            # Its own config: a decode engine may give the plain model another attention implementation.
            copy.deepcopy(causal_lm.config),
            dtype=cast.dtype or causal_lm.dtype,
            attn_implementation=causal_lm.config._attn_implementation,
        )
    # peft names a target's weight "<path>.base_layer.weight"; the plain model names it "<path>.weight".
    source = {}
    for kind in ("parameters", "buffers"):
        for name, tensor in getattr(causal_lm, f"named_{kind}")(remove_duplicate=False):
            if ".lora_" not in name:
                source[name.replace(".base_layer.", ".")] = tensor
    target_paths = {name for name, _ in targets}
    for kind in ("parameters", "buffers"):
        for name, _tensor in list(getattr(plain, f"named_{kind}")(remove_duplicate=False)):
            path, _, leaf = name.rpartition(".")
            module = plain.get_submodule(path)
            shared = cast(source[name], buffer=kind == "buffers")
            if own_targets and path in target_paths and leaf == "weight":
                shared = torch.nn.Parameter(shared.detach().clone(), requires_grad=False)
            getattr(module, f"_{kind}")[leaf] = shared
    # Tied weights (lm_head = embed_tokens) stay tied: both names map to the one source tensor.
    leftovers = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"plain decode model: tensors without a source: {leftovers[:3]}")
    plain.eval()
    return plain
