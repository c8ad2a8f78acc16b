"""``backend="auto"`` on CUDA tensors: each primitive on the backend measured fastest for it.

:class:`AutoBackend` owns no kernels. It resolves, once, a route per primitive from the
preference table below and the backends usable here (the first usable one of each list
wins; ``torch`` is always usable and ends every list), then hands every call to that
backend's object unchanged. Mixing backends inside one Sinkhorn run or one loss is sound:
each primitive is self-contained per the seam's conventions (``base.py``: potentials, LSE
and coefficient vectors in the accumulation dtype; every backend rounds the logits
``s * S + g`` as PyTorch does), and nothing above the seam looks at a backend's ``name``
or identity. A streaming primitive is handed over whole, so e.g. the ``cuda`` backend's
generic chunked ``ncl_grad_xy`` still runs its own dense gradient kernel on each chunk.

The registry (``backends.get``) builds one for CUDA tensors when ``cuda`` or ``triton``
is usable there; ``get("auto", device).routes`` says what it picked.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from .base import Backend, Tensor

PRIMITIVES = ("row_lse", "col_lse", "ncl_grad_", "apply_biases_", "row_lse_xy", "col_lse_xy",
              "ncl_grad_xy")
#: the backends with GPU kernels of their own; ``auto`` routes among these (and ``torch``)
KERNELS = ("cuda", "triton")

# Preference per primitive for float32/bfloat16/float16 storage, fastest first. Median ms
# on an NVIDIA H200 (bench/RESULTS.md, GPU run 2026-11-28, torch 2.11+cu130, triton 3.6):
# dense 32768 x 32768 float32 | bfloat16, streaming 65536 x 65536 x 512 bfloat16.
#
#   row_lse        triton 1.08 | 0.98   cuda 1.28 | 1.43   torch 25 | 31
#   col_lse        cuda   1.23 | 1.13   triton 1.84 | 2.67 torch 34 | 29
#   ncl_grad_      cuda   2.94 | 3.55   triton 4.25 | 3.17 torch 223 | 183   (new out)
#                  cuda   4.90 | 4.49   triton 6.05 | 4.02 torch 210 | 177   (in place)
#   apply_biases_  cuda   4.19 | 2.08   triton 4.33 | 2.10 torch 14 | 16
#   row/col_lse_xy triton 14.3          cuda 156           torch 240
#   ncl_grad_xy    cuda 461             torch 1105         triton 1335
#
# float16 was not measured; it takes the bfloat16 routes (same kernels, same bytes).
# ncl_grad_ is not routed per dtype: Triton wins bfloat16 by ~11% (0.4 ms at 32768²) and
# loses float32 by ~45%; one order keeps the table (and its tests) one-dimensional, and
# the gradient pass is one pass of a fwd+bwd loss step that runs Sinkhorn passes too.
# ncl_grad_xy: Triton's fused kernel recomputes the score tiles per output block and was
# slower than the chunked cuBLAS + PyTorch path, so it is never picked (torch is always
# usable and comes before it).
ROUTES: Dict[str, Tuple[str, ...]] = {
    "row_lse": ("triton", "cuda", "torch"),
    "col_lse": ("cuda", "triton", "torch"),
    "ncl_grad_": ("cuda", "triton", "torch"),
    "apply_biases_": ("cuda", "triton", "torch"),
    "row_lse_xy": ("triton", "cuda", "torch"),
    "col_lse_xy": ("triton", "cuda", "torch"),
    "ncl_grad_xy": ("cuda", "torch"),
}
# float64 storage: the cuda backend has native float64 kernels; the triton backend hands
# float64 to the torch backend, so it is never better than torch and is left out.
ROUTES_FLOAT64 = ("cuda", "torch")


def plan(usable: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """``{primitive: {"float": name, "float64": name}}`` for the usable backend names."""
    have = set(usable) | {"torch"}

    def first(order):
        return next(name for name in order if name in have)

    wide = first(ROUTES_FLOAT64)
    return {p: {"float": first(ROUTES[p]), "float64": wide} for p in PRIMITIVES}


class AutoBackend(Backend):
    """Routes each primitive, by storage dtype, to the backend :func:`plan` picks.

    ``usable``: the backend names usable for the tensors (``torch`` is implied).
    ``instance``: name -> backend object; called on first use of a route, so building an
    ``AutoBackend`` instantiates (and needs) no backend and no GPU.
    """

    name = "auto"

    def __init__(self, usable: Iterable[str], instance: Callable[[str], Backend]):
        self.routes = plan(usable)
        self._instance = instance

    def part(self, primitive: str, dtype: torch.dtype) -> Backend:
        """The backend object that runs ``primitive`` on storage ``dtype``."""
        route = self.routes[primitive]
        return self._instance(route["float64" if dtype == torch.float64 else "float"])

    # -- dense primitives ----------------------------------------------------------------
    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        return self.part("row_lse", S.dtype).row_lse(S, scale, g)

    def col_lse(self, S: Tensor, scale: float, f: Optional[Tensor] = None) -> Tensor:
        return self.part("col_lse", S.dtype).col_lse(S, scale, f)

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        return self.part("ncl_grad_", S.dtype).ncl_grad_(
            S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, out=out,
            row_offset=row_offset)

    def apply_biases_(self, S, scale, f=None, g=None):
        return self.part("apply_biases_", S.dtype).apply_biases_(S, scale, f, g)

    # -- streaming primitives ------------------------------------------------------------
    def row_lse_xy(self, X: Tensor, Y: Tensor, scale: float,
                   g: Optional[Tensor] = None) -> Tensor:
        return self.part("row_lse_xy", X.dtype).row_lse_xy(X, Y, scale, g)

    def col_lse_xy(self, X: Tensor, Y: Tensor, scale: float,
                   f: Optional[Tensor] = None) -> Tensor:
        return self.part("col_lse_xy", X.dtype).col_lse_xy(X, Y, scale, f)

    def ncl_grad_xy(self, X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                    need_dx=True, need_dy=True):
        return self.part("ncl_grad_xy", X.dtype).ncl_grad_xy(
            X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, need_dx=need_dx,
            need_dy=need_dy)
