"""Lazy, loud loading of the compiled modules.

The package must import on a machine where a compiled module is missing (built without
CUDA, a source checkout, a broken toolchain): each module is imported on first use, and a
failure is remembered and reported as the reason the backend is not usable.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

_cache: Dict[str, Tuple[Optional[object], str]] = {}

#: storage dtype -> the dtype code of csrc/common/ncl_math.h
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_HINT = {
    "_C_cpu": "reinstall with `pip install .` (needs a C++17 compiler and CMake)",
    "_C_cuda": "reinstall with NCL_CUDA=ON `pip install .` on a machine with nvcc",
}


def load(name: str) -> Tuple[Optional[object], str]:
    """Return ``(module or None, why not)`` for ``ncl_kernels.<name>``."""
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"ncl_kernels.{name}"), "")
        except ImportError as exc:  # missing or unloadable shared object
            _cache[name] = (None, f"ncl_kernels.{name} is not built or not loadable "
                                  f"({exc}); {_HINT[name]}")
    return _cache[name]


def require(name: str):
    module, why = load(name)
    if module is None:
        raise RuntimeError(why)
    return module


# -- what both compiled backends (and any other pointer-taking one) hand their kernels ---

def row_stride(S: torch.Tensor) -> int:
    # a single row may carry any stride (e.g. a slice of a transpose); the kernels only
    # need one that keeps rows apart
    return S.stride(0) if S.shape[0] > 1 else S.shape[1]


def rows_ok(t: torch.Tensor) -> bool:
    """Unit column stride and rows that do not overlap: what the kernels can address."""
    n, m = t.shape
    return (m <= 1 or t.stride(1) == 1) and (n <= 1 or t.stride(0) >= m)


def readable(S: torch.Tensor) -> torch.Tensor:
    """S itself when the kernels can address it, else a contiguous copy (a transposed or
    expanded view; not reachable through the validated API, whose columns have stride 1)."""
    return S if rows_ok(S) else S.contiguous()


def vec(v: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A contiguous vector of ``dtype`` that a kernel may read (None stays None)."""
    return None if v is None else v.to(dtype).contiguous()


def ptr(t: Optional[torch.Tensor]) -> int:
    """A tensor's address for a kernel; 0 (the kernels' "absent") for None."""
    return 0 if t is None else t.data_ptr()


def block_args(S: torch.Tensor, scale: float) -> dict:
    """The keyword arguments every primitive of ``_C_cpu`` and ``_C_cuda`` starts with."""
    return {"s_ptr": S.data_ptr(), "n": S.shape[0], "m": S.shape[1], "row_stride": row_stride(S),
            "dtype": DTYPE_CODES[S.dtype], "scale": float(scale)}


def grad_target(S: torch.Tensor, out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Where a gradient kernel writes: ``out`` when it has S's dtype and an addressable
    layout (S itself included: each element is read before it is written), else a
    temporary that the caller copies into ``out`` afterwards."""
    if out is None or (out.dtype == S.dtype and rows_ok(out)):
        return out
    return torch.empty(S.shape, dtype=S.dtype, device=S.device)


_sm_counts: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached: the query costs a driver call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]
