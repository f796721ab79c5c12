"""Layers of the decode copies (decode_weights.py) that do in one call what transformers' modules do in several.

Why: a decode step at the trainer's batch sizes is bound by how many kernels it launches, not by their work.
SmolLM2-135M (30 layers) runs ~1,350 kernels per step. On an H200, 256 rows take 4.8 ms of GPU time even as one
CUDA graph, ~3.6 us per kernel. Per layer, transformers' RMSNorm is 8 of those kernels (casts, pow, mean, add,
rsqrt, two products), and q/k/v and gate/up are 5 GEMMs of one input. So:
- SiblingGroup: the projections of one input (a layer's q, k and v; the MLP's gate and up) as one GEMM over their
  weights stacked, each member a SiblingSlice of the product. On CPU the stacked weight is pre-packed by oneDNN
  (packed_linear.py), where one larger GEMM also beats three small ones (~53 against ~84 us at 32 rows).
- FusedRMSNorm: torch's rms_norm with the weight, one fused kernel on CUDA.
Both are exact in float32 (the CPU tests compare greedy tokens with the peft model). In bf16 they round once where
transformers rounds twice, so a value may differ by one unit in the last place.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F

from .packed_linear import PackedLinear


class SiblingGroup:
    """Projections of one input as one GEMM: y_i = x W_i^T for the members' weights W_i stacked by rows.

    Each member is a SiblingSlice in the model, called as the plain projection would be. The first member called
    with an input computes the product for all of them. The others, called with that same tensor, take their slice
    of it, and the last member drops it. A member called with another input (a model whose attention calls its
    projections otherwise) computes the product again: slower, never wrong.

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
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

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

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input:
            product = self.packed(x) if self.packed is not None else F.linear(x, self.dense_weight())
            self._input, self._outputs = x, product.split(self.sizes, dim=-1)
        out = self._outputs[index]
        if index == len(self.sizes) - 1:
            self._input, self._outputs = None, ()
        return out


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


class FusedRMSNorm(torch.nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dimension, as one call of torch's rms_norm."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, fused"


@torch.no_grad()
def same_as(norm: torch.nn.Module) -> FusedRMSNorm | None:
    """A FusedRMSNorm sharing `norm`'s weight where it computes what `norm` does, else None.

    Checked on a random input in float32 (exactly equal), so a model whose norm is something else (Gemma's
    (1 + weight), a bias, another axis) keeps its own module."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    probe_weight = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(norm).float()  # the module's own forward, over a float32 probe weight
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
