"""C++ CPU backend (``ncl_kernels._C_cpu``: OpenMP, one read of S per LSE).

Primitives that have no C++ kernel yet are inherited from the PyTorch backend, so the
backend is complete today and gets faster primitive by primitive. Today: ``row_lse`` (and
through it the row passes of the streaming forms).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from .base import Tensor, acc_dtype
from .torch import TorchBackend


def status():
    module, why = _native.load("_C_cpu")
    return module is not None, module is not None, why


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self):
        self._C = _native.require("_C_cpu")

    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        N, M = S.shape
        out = torch.empty(N, dtype=acc_dtype(S.dtype), device=S.device)
        if g is not None:
            g = g.contiguous()
        self._C.row_lse(S.data_ptr(), N, M, _native.row_stride(S),
                        _native.DTYPE_CODES[S.dtype], float(scale),
                        0 if g is None else g.data_ptr(), out.data_ptr(),
                        torch.get_num_threads())
        return out
