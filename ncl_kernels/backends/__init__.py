"""The backends: which exist, which are usable here, and the kernels each one runs.

The declarations, ``auto``'s routes and the one resolution rule live in
:mod:`.registry`; this module is its public face. ``backend="auto"`` picks, per primitive
and storage dtype, the backend measured fastest for the tensors' device type: the C++
module for CPU tensors (else ``torch``); on CUDA tensors Triton or the CUDA module per
primitive (``registry.ROUTES``), falling back to ``torch``; ``torch`` on other devices.
``get("auto", torch.device("cuda")).routes`` says what it picked here.
"""

from __future__ import annotations

from typing import Dict

# not ``import torch``: the submodule .torch (the PyTorch backend) takes that name here
import torch as _torch

from . import registry
from .registry import PRIMITIVES, KernelSet, replaced

__all__ = ["NAMES", "PRIMITIVES", "backends", "get", "replaced", "registry"]

#: the declared backends (``"auto"`` is a policy over them, not a backend)
NAMES = registry.names()


def backends() -> Dict[str, dict]:
    """Report every backend: ``{name: {"built", "usable", "devices", "why", "build"}}``.

    ``why`` is empty for a usable backend and otherwise says what is missing; ``build``
    says how the backend is built.
    """
    return registry.report()


def get(name: str, device: _torch.device) -> KernelSet:
    """The kernels of backend ``name`` (or ``"auto"``) for tensors on ``device``.

    Raises ``ValueError`` naming the reason when ``name`` is unknown, not usable here, or
    does not run on ``device``.
    """
    device = _torch.device(device)
    return KernelSet(registry.check(name, device), device.type)
