"""Linear layers whose weights oneDNN has pre-packed once, for the CPU decode copies (decode_weights.py).

Why: on CPU, `F.linear` hands oneDNN/MKL the weight in its plain row-major layout at every call, and at a decode
step's shapes (32 rows x 576 -> 1536 and the like) that costs 2-3x what oneDNN takes with the weight reordered once
into its blocked layout (2 cores, AMD EPYC avx512_bf16, 32 x 576 -> 1536: bf16 145 -> 78 us, float32 408 -> 131
us; in process, 32 rows x 64 tokens: float32 1.9x the tokens/s, the bf16 copy 1.09x; bench/RESULTS.md, issue
#20). The reorder is what torch.compile's inductor does for frozen CPU weights (torch.ops.mkldnn.
_reorder_linear_weight and _linear_pointwise); here it is done without compiling, once per weight, and again
whenever a merged weight is rewritten (`load`).

The result is the same product: bf16 bit-equal to F.linear on the shapes tested, float32 within a few ulps (the
summation order differs).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def packing_available(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU pre-pack `dtype` linear weights, checked by packing a small one and comparing its
    product with F.linear (a torch without the ops, or a CPU without bf16 support, answers False)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator).to(dtype)
        x = torch.randn(3, 16, generator=generator).to(dtype)
        packed = PackedLinear(weight, None)
        return torch.allclose(packed(x).float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError) as exc:  # the ops missing from this build, or refusing this CPU
        log.info("linear weights are not pre-packed on this CPU (%r): decoding with F.linear", exc)
        return False


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W held only in oneDNN's packed layout (no plain copy: `dense_weight()` unpacks it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.load(weight)

    @torch.no_grad()
    def load(self, weight: torch.Tensor) -> None:
        """Pack `weight` (out_features x in_features) as this layer's weight, replacing the one it had."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} for a {self.in_features}->{self.out_features} layer"
            )
        # A plain attribute, not a parameter: an opaque oneDNN tensor has no storage to share, save or count.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed"


class PackedGroup:
    """Sibling projections of one input (a layer's q, k and v; the MLP's gate and up) as one packed GEMM.

    Each member is a PackedSlice in the model, called as the plain projection would be: the first member called with
    an input computes the product for all of them, and the others, called with that same tensor, take their slice
    of it (the last member drops it). Three GEMMs of 576 -> 576, 192, 192 at 32 rows take ~84 us, one of 576 -> 960
    ~53 us; fewer, larger parallel regions also suffer less when other processes share the cores. A member called
    with another input (a model whose attention calls its projections otherwise) computes the product again: slower,
    never wrong."""

    def __init__(self, weights: list[torch.Tensor]):
        self.sizes = [w.shape[0] for w in weights]
        self.layer = PackedLinear(torch.cat([w.detach() for w in weights]), None)
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def load(self, parts: dict[int, torch.Tensor]) -> None:
        """Pack again with member i's weight replaced by parts[i] (members not in parts keep theirs)."""
        current = self.layer.dense_weight().split(self.sizes) if len(parts) < len(self.sizes) else ()
        self.layer.load(torch.cat([parts[i] if i in parts else current[i] for i in range(len(self.sizes))]))

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input:
            self._input, self._outputs = x, self.layer(x).split(self.sizes, dim=-1)
        out = self._outputs[index]
        if index == len(self.sizes) - 1:
            self._input, self._outputs = None, ()
        return out


class PackedSlice(torch.nn.Module):
    """Member `index` of a PackedGroup: y = x W_index^T."""

    def __init__(self, group: PackedGroup, index: int):
        super().__init__()
        self.group, self.index = group, index
        self.out_features = group.sizes[index]
        self.in_features = group.layer.in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.group.layer.dtype

    def dense_weight(self) -> torch.Tensor:
        start = sum(self.group.sizes[: self.index])
        return self.group.layer.dense_weight()[start : start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)
