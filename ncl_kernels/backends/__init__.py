"""Backend registry: which backends exist, which are usable here, and picking one.

``backend="auto"`` picks the fastest backend measured for the tensors' device
(bench/RESULTS.md, bench/profile_cpu.py):

* CPU tensors: ``"cpu"`` (the C++ module: fused one-pass kernels with a SIMD ``exp``,
  several times faster than the chunked PyTorch passes in every storage dtype) when it is
  built and loads; otherwise ``"torch"``;
* CUDA tensors: ``"torch"``; the CUDA and Triton kernels join ``auto`` once they have been
  measured on a GPU; until then name them explicitly.
"""

from __future__ import annotations

from typing import Dict

import torch

from . import cpu as _cpu, cuda as _cuda, triton as _triton
from .base import Backend
from .torch import TorchBackend

NAMES = ("torch", "cpu", "cuda", "triton")
_DEVICES = {"torch": None, "cpu": "cpu", "cuda": "cuda", "triton": "cuda"}
_instances: Dict[str, Backend] = {}


def _triton_status():
    return _triton.status()


def _devices(name: str):
    # Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors
    return _triton.devices() if name == "triton" else _DEVICES[name]


def _status(name: str):
    if name == "torch":
        return True, True, ""
    if name == "cpu":
        return _cpu.status()
    if name == "cuda":
        return _cuda.status()
    return _triton_status()


def backends() -> Dict[str, dict]:
    """Report every backend: ``{name: {"built", "usable", "devices", "why"}}``.

    ``why`` is empty for a usable backend and otherwise says what is missing.
    """
    report = {}
    for name in NAMES:
        built, usable, why = _status(name)
        report[name] = {"built": built, "usable": usable,
                        "devices": _devices(name) or "any", "why": why}
    return report


def _instance(name: str) -> Backend:
    if name not in _instances:
        _instances[name] = {"torch": TorchBackend, "cpu": _cpu.CpuBackend,
                            "cuda": _cuda.CudaBackend, "triton": _triton.make_backend}[name]()
    return _instances[name]


def get(name: str, device: torch.device) -> Backend:
    """The backend object for ``name`` (or ``"auto"``) and tensors on ``device``."""
    if name == "auto":
        if device.type == "cpu" and _cpu.status()[1]:
            return _instance("cpu")
        return _instance("torch")
    if name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, NAMES))}; "
                         f"got {name!r}")
    built, usable, why = _status(name)
    if not usable:
        raise ValueError(f"backend {name!r} is not usable here: {why}")
    wanted = _devices(name)
    if wanted is not None and device.type != wanted:
        raise ValueError(f"backend {name!r} runs on {wanted} tensors; got tensors on "
                         f"{device}")
    return _instance(name)
