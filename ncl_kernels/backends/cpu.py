"""C++ CPU backend (``ncl_kernels._C_cpu``: OpenMP, one read of S per LSE).

Primitives that have no C++ kernel yet are inherited from the PyTorch backend, so the
backend is complete today and gets faster primitive by primitive. Today: ``row_lse`` (and
through it the row passes of the streaming forms).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from .base import Tensor
from .torch import TorchBackend


def status():
    module, why = _native.load("_C_cpu")
    return module is not None, module is not None, why


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self):
        self._C = _native.require("_C_cpu")

    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        out, _g_alive, args = _native.row_lse_call(S, scale, g)
        self._C.row_lse(*args, torch.get_num_threads())
        return out
