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

import functools
import logging
import platform

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def native_bf16_matmul() -> bool:
    """Whether this is an x86 CPU with bf16 matrix instructions (AVX512-BF16 or AMX tiles). oneDNN runs bf16 on
    any AVX-512 CPU (`torch.ops.mkldnn._is_mkldnn_bf16_supported`), but without them by emulation, slower than
    float32. Other architectures answer False: bf16 decoding has not been measured there."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    checks = (
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return any(check is not None and check() for check in checks)


@functools.cache  # a fact of this torch build and CPU: probed once per dtype (the Student asks twice as it loads)
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
