"""Layers of the decode copies (decode_weights.py) that do in one call what transformers' modules do in several.

Why: a decode step at the trainer's batch sizes is bound by how many kernels it runs, not by their work. On an
H200, SmolLM2-135M (30 layers) at 256 rows ran 1,317 kernels per step through transformers' modules, ~3.3 us each
(4.4 ms of GPU time even as one CUDA graph). Per layer: RMSNorm is 8 kernels (casts, pow, mean, add, rsqrt, two
products) twice, the rotary embedding 10, q/k/v and gate/up 5 GEMMs of one input, the SwiGLU 2. So:
- SiblingGroup: the projections of one input (a layer's q, k and v; the MLP's gate and up) as one GEMM over their
  weights stacked. On CPU the stacked weight is pre-packed by oneDNN (packed_linear.py), where one larger GEMM also
  beats three small ones (~53 against ~84 us at 32 rows).
- FusedAttention / FusedMLP: the attention and MLP modules over those products, with the rotary embedding and the
  SwiGLU as one kernel each on CUDA; FusedRMSNorm likewise. The kernels are Liger Kernel's (Triton), where
  liger-kernel is installed (the gpu extra); elsewhere the same torch ops transformers runs.
On CUDA that is 560 kernels per step and 2.7 ms (bench/RESULTS.md, "the decode step in fewer kernels"). Every
replacement is checked against the module it replaces when the copies are made; on CPU in float32 the results are
bit-equal, and the CUDA kernels round as transformers does up to the order of their sums
(tests/trainer/test_cuda_fused_layers.py).
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import threading
from types import SimpleNamespace
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .packed_linear import PackedLinear


class SiblingGroup:
    """Projections of one input as one GEMM: y_i = x W_i^T for the members' weights W_i stacked by rows.

    Each member is a SiblingSlice in the model, called as the plain projection would be. The first member called
    with an input computes the product for all of them. The others, called with that same tensor on the same
    thread, take their slice of it, and the last member drops it. A member called with another input (a model whose
    attention calls its projections otherwise) computes the product again: slower, never wrong.

    weight: the stacked weight (sum of sizes x in_features), used as it is (no copy): a caller may pass a tensor
    whose rows other layers view. pack: keep it only in oneDNN's packed layout (CPU)."""

    def __init__(self, weight: torch.Tensor, sizes: list[int], *, pack: bool):
        if sum(sizes) != weight.shape[0]:
            raise ValueError(
                f"member sizes {sizes} do not add up to the {weight.shape[0]} rows of the weight"
            )
        self.sizes = sizes
        self.in_features = weight.shape[1]
        self.packed = PackedLinear(weight, None) if pack else None
        self.weight = None if pack else weight
        # per thread (the decode engine may prefill on one thread while it decodes on another): the input whose
        # product is being handed out, and that product's slices
        self._last: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype if self.packed is not None else self.dense_weight().dtype

    def dense_weight(self) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.dense_weight()
        assert self.weight is not None
        return self.weight

    def rows(self, index: int) -> slice:
        start = sum(self.sizes[:index])
        return slice(start, start + self.sizes[index])

    @torch.no_grad()
    def load(self, parts: dict[int, torch.Tensor]) -> None:
        """Member i's weight becomes parts[i] (members not in parts keep theirs). Packed: packed again, once."""
        if self.packed is None:
            assert self.weight is not None
            for index, part in parts.items():
                self.weight[self.rows(index)].copy_(part)
            return
        current = self.dense_weight() if len(parts) < len(self.sizes) else None
        stacked = [
            parts[i] if i in parts else current[self.rows(i)]  # type: ignore[index]
            for i in range(len(self.sizes))
        ]
        self.packed.load(torch.cat(stacked))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, side by side in the last dimension."""
        return self.packed(x) if self.packed is not None else F.linear(x, self.dense_weight())

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        thread = threading.get_ident()
        last = self._last.get(thread)
        if last is None or last[0] is not x:
            last = self._last[thread] = (x, self.product(x).split(self.sizes, dim=-1))
        if index == len(self.sizes) - 1:
            del self._last[thread]
        return last[1][index]


class SiblingSlice(torch.nn.Module):
    """Member `index` of a SiblingGroup: y = x W_index^T."""

    def __init__(self, group: SiblingGroup, index: int):
        super().__init__()
        self.group, self.index = group, index
        self.out_features = group.sizes[index]
        self.in_features = group.in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.group.dtype

    def dense_weight(self) -> torch.Tensor:
        return self.group.dense_weight()[self.group.rows(self.index)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        packed = ", packed" if self.group.packed is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, member {self.index}{packed}"
        )


@functools.cache
def triton_kernels() -> Any:
    """Liger Kernel's Triton ops (rms_norm, rope, swiglu) where they can run (liger-kernel and triton installed, a
    CUDA device), else None: the layers below then compute the same with torch ops."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.ops import rms_norm, rope, swiglu  # pyright: ignore[reportMissingImports]
    except ImportError:  # liger-kernel is in the gpu extra; elsewhere the torch ops serve
        return None
    return SimpleNamespace(
        rms_norm=rms_norm.rms_norm_forward, rope=rope.rope_forward, swiglu=swiglu.swiglu_fused_gate_up_forward
    )


class FusedRMSNorm(torch.nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dimension, computed in float32 and cast back before
    the weight is applied (transformers' Llama rounding). One Triton kernel on CUDA; torch's rms_norm elsewhere."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and (kernels := triton_kernels()) is not None:
            return kernels.rms_norm(x, self.weight, self.eps, 0.0, "llama", None)[0]
        if x.dtype != torch.float32:
            return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, fused"


@torch.no_grad()
def same_as(norm: torch.nn.Module) -> FusedRMSNorm | None:
    """A FusedRMSNorm sharing `norm`'s weight where it computes what `norm` does, else None.

    Checked on a random input in float32 on the CPU (exactly equal: the torch path), so a model whose norm is
    something else (Gemma's (1 + weight), a bias, another axis) keeps its own module."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    probe_weight = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(norm).float().cpu()  # the module's own forward, over a float32 probe weight
    cast(torch.Tensor, reference.weight).copy_(probe_weight)
    try:
        same = torch.equal(reference(x), FusedRMSNorm(probe_weight, eps)(x))
    except (RuntimeError, TypeError):
        return None
    return FusedRMSNorm(weight, eps) if same else None


def fuse_norms(model: torch.nn.Module) -> int:
    """Replace every RMSNorm of `model` that FusedRMSNorm computes exactly by one (same weight tensor); returns how
    many were replaced."""
    replaced = 0
    for path, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RMSNorm") or (fused := same_as(module)) is None:
            continue
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, fused)
        replaced += 1
    return replaced


class FusedMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one GEMM (their SiblingGroup) and the SwiGLU as one Triton
    kernel over that product on CUDA. Keeps the module's layer names, so paths such as mlp.gate_proj still lead to
    the layers (the merge rewrites them there)."""

    gate_proj: torch.nn.Module
    up_proj: torch.nn.Module
    down_proj: torch.nn.Module

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            mlp.get_submodule(n) for n in ("gate_proj", "up_proj", "down_proj")
        )
        self.group = cast(SiblingSlice, mlp.gate_proj).group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.group.product(x)
        if x.is_cuda and (kernels := triton_kernels()) is not None:
            hidden = kernels.swiglu(gate_up)[1]
        else:
            gate, up = gate_up.split(self.group.sizes, dim=-1)
            hidden = F.silu(gate) * up
        return self.down_proj(hidden)


class FusedAttention(torch.nn.Module):
    """A Llama-style attention layer (q/k/v projections, rotary positions, the model's attention function, o_proj)
    with q, k and v as one GEMM and the rotary embedding of q and k as one Triton kernel on CUDA (transformers'
    apply_rotary_pos_emb is 10 kernels). The slot engine's decode copies attend over the slot cache through the
    attention function (decode/attention.py); generation.py's loop passes a transformers KV cache, which is updated
    as the original module updates it. Attributes the attention functions read (layer_idx, scaling, config, ...)
    are the original module's."""

    SHARED = (
        "config",
        "layer_idx",
        "head_dim",
        "scaling",
        "is_causal",
        "num_key_value_groups",
        "attention_dropout",
    )
    config: Any
    layer_idx: int
    head_dim: int
    scaling: float
    o_proj: torch.nn.Module

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        for name in self.SHARED:
            if hasattr(attention, name):
                setattr(self, name, getattr(attention, name))
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.o_proj = attention.get_submodule("o_proj")
        self.group = cast(SiblingSlice, attention.q_proj).group
        # The model's own rotary function, for devices without the Triton kernel (exactly transformers' result).
        self.apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (
            part.view(shape).transpose(1, 2)
            for part in self.group.product(hidden_states).split(self.group.sizes, -1)
        )
        cos, sin = position_embeddings
        if hidden_states.is_cuda and (kernels := triton_kernels()) is not None:
            query, key = kernels.rope(query, key, cos, sin)[:2]
        else:
            query, key = self.apply_rotary(query, key, cos, sin)
        # transformers 5 names the KV cache `cache`; 4.x `past_key_values` (`past_key_value` before 4.56's rename).
        # Each popped (none may reach the attention function), and never tested for truth: an empty cache has len 0.
        caches = [kwargs.pop(name, None) for name in ("cache", "past_key_values", "past_key_value")]
        cache = next((c for c in caches if c is not None), None)
        if cache is not None:
            key, value = _update_cache(cache, key, value, self.layer_idx, cos, sin, kwargs)
        attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attend(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _update_cache(cache, key, value, layer_idx: int, cos, sin, kwargs: dict):
    """The layer's keys and values appended to a transformers Cache, in the form of the installed version's update
    (5.x takes the forward's kwargs; 4.x a dict of rotary tensors and cache positions)."""
    if _update_takes_kwargs(type(cache)):
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    return cache.update(
        key, value, layer_idx, {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
    )


@functools.cache
def _update_takes_kwargs(cache_type: type) -> bool:
    """Once per cache class, not per layer and step: inspect.signature costs tens of microseconds."""
    return "kwargs" in inspect.signature(cache_type.update).parameters


@torch.no_grad()
def fuse_blocks(model: torch.nn.Module) -> int:
    """Replace each attention and MLP module of `model` whose projections are sibling groups by a FusedAttention or
    FusedMLP, where the fused module gives the original's output on a random probe (a model whose layer does more,
    such as Qwen3's q/k norms, or a non-SiLU MLP, keeps its own). Returns how many were replaced."""
    replaced = 0
    for path, module in list(model.named_modules()):
        fused = _fused_block(module)
        if fused is None:
            continue
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, fused)
        replaced += 1
    return replaced


def _fused_block(module: torch.nn.Module) -> torch.nn.Module | None:
    siblings = lambda *names: all(isinstance(getattr(module, n, None), SiblingSlice) for n in names)  # noqa: E731
    if siblings("q_proj", "k_proj", "v_proj") and hasattr(module, "o_proj") and hasattr(module, "head_dim"):
        # FusedAttention keeps the model's own rotary function for the torch path: a model without one keeps its
        # own attention.
        if not hasattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb"):
            return None
        fused = FusedAttention(module)
        return fused if _same_attention(module, fused) else None
    if siblings("gate_proj", "up_proj") and hasattr(module, "down_proj"):
        fused = FusedMLP(module)
        return (
            fused
            if _same_output(module, fused, _probe(module, cast(SiblingSlice, module.gate_proj).in_features))
            else None
        )
    return None


def _probe(module: torch.nn.Module, width: int, rows: int = 2, length: int = 3) -> torch.Tensor:
    weight = next(module.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    group = next(m for m in module.children() if isinstance(m, SiblingSlice)).group
    generator = torch.Generator().manual_seed(2)
    return torch.randn(rows, length, width, generator=generator).to(device=device, dtype=group.dtype)


def _same_output(original, fused, *inputs, **kwargs) -> bool:
    try:
        expected, got = original(*inputs, **kwargs), fused(*inputs, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return False
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = got[0] if isinstance(got, tuple) else got
    if expected.dtype == torch.float32 and not expected.is_cuda:
        return torch.equal(expected, got)
    return torch.allclose(
        expected.float(), got.float(), rtol=2e-2, atol=2e-2
    )  # kernels that round differently


def _same_attention(original, fused: FusedAttention) -> bool:
    hidden = _probe(original, fused.group.in_features)
    rows, length = hidden.shape[:2]
    generator = torch.Generator().manual_seed(3)
    angles = torch.rand(rows, length, fused.head_dim // 2, generator=generator).to(hidden.device) * 6.0
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(hidden.dtype), angles.sin().to(hidden.dtype)
    return _same_output(original, fused, hidden, (cos, sin), None)
