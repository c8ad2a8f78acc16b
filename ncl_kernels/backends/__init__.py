"""Backend registry: which backends exist, which are usable here, and picking one.

``backend="auto"`` picks the fastest backend measured for the tensors' device
(bench/RESULTS.md, bench/profile_cpu.py):

* CPU tensors: ``"cpu"`` (the C++ module: fused one-pass kernels with a SIMD ``exp``,
  several times faster than the chunked PyTorch passes in every storage dtype) when it is
  built and loads; otherwise ``"torch"``;
* CUDA tensors: when ``"cuda"`` or ``"triton"`` is usable, an :class:`~.auto.AutoBackend`
  that runs each primitive on the backend measured fastest for it on an H200
  (bench/RESULTS.md, GPU run 2026-11-28): Triton for dense ``row_lse`` and the streaming
  LSE passes, the CUDA module for the other primitives and for all float64 work, each
  falling back down a short preference list (``auto.py``) that ends in ``"torch"``;
  ``get("auto", device).routes`` says what it picked. With neither usable, ``"torch"``;
* other devices: ``"torch"``.
"""

from __future__ import annotations

from typing import Dict

import torch

from . import auto as _auto, cpu as _cpu, cuda as _cuda, triton as _triton
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


def _usable_on(name: str, device_type: str) -> bool:
    """Whether ``name`` is usable here and takes tensors of ``device_type`` (Triton under
    its interpreter takes CPU tensors, not CUDA ones)."""
    return _status(name)[1] and _devices(name) in (None, device_type)


def _auto_cuda() -> Backend:
    """``auto`` for CUDA tensors: the composite over the usable GPU kernels, else torch."""
    kernels = tuple(k for k in _auto.KERNELS if _usable_on(k, "cuda"))
    if not kernels:
        return _instance("torch")
    key = "auto:" + ",".join(kernels)
    if key not in _instances:  # its parts are instantiated on first use, not here
        _instances[key] = _auto.AutoBackend(kernels, _instance)
    return _instances[key]


def get(name: str, device: torch.device) -> Backend:
    """The backend object for ``name`` (or ``"auto"``) and tensors on ``device``."""
    if name == "auto":
        if device.type == "cpu" and _cpu.status()[1]:
            return _instance("cpu")
        if device.type == "cuda":
            return _auto_cuda()
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
