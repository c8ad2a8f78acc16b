"""Lazy, loud loading of the compiled modules.

The package must import on a machine where a compiled module is missing (built without
CUDA, a source checkout, a broken toolchain): each module is imported on first use, and a
failure is remembered and reported as the reason the backend is not usable.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

from .._dtypes import acc_dtype

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


def row_stride(S: torch.Tensor) -> int:
    # a single row may carry any stride (e.g. a slice of a transpose); the kernels only
    # need one that keeps rows apart
    return S.stride(0) if S.shape[0] > 1 else S.shape[1]


def row_lse_call(S: torch.Tensor, scale: float, g):
    """The output buffer and the leading arguments of a compiled ``row_lse``.

    Both modules take ``(s_ptr, n, m, row_stride, dtype, scale, g_ptr, out_ptr, ...)``;
    the caller appends its launch argument (thread count or stream).
    """
    N, M = S.shape
    out = torch.empty(N, dtype=acc_dtype(S.dtype), device=S.device)
    g_ptr = 0
    if g is not None:
        g = g.contiguous()
        g_ptr = g.data_ptr()
    args = (S.data_ptr(), N, M, row_stride(S), DTYPE_CODES[S.dtype], float(scale), g_ptr,
            out.data_ptr())
    return out, g, args
