"""CUDA backend (``ncl_kernels._C_cuda``), launched on the caller's current stream.

Like the CPU backend it inherits from the PyTorch backend every primitive that has no
kernel yet. Today: ``row_lse``. It is chosen only when named (``backend="cuda"``):
``"auto"`` keeps CUDA tensors on the PyTorch backend until these kernels have been
checked on a GPU (see the README's backend table).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from .base import Tensor
from .torch import TorchBackend


def status():
    module, why = _native.load("_C_cuda")
    if module is None:
        return False, False, why
    if not torch.cuda.is_available():
        return True, False, "no CUDA device is visible to PyTorch"
    if module.device_count() == 0:
        return True, False, "the CUDA runtime finds no device"
    return True, True, ""


class CudaBackend(TorchBackend):
    name = "cuda"

    def __init__(self):
        self._C = _native.require("_C_cuda")

    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        out, _g_alive, args = _native.row_lse_call(S, scale, g)
        # the module links its own cudart: make the tensor's device current for the launch
        with torch.cuda.device(S.device):
            self._C.row_lse(*args, torch.cuda.current_stream(S.device).cuda_stream)
        return out
