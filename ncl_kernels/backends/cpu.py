"""C++ CPU backend (``ncl_kernels._C_cpu``): fused one-pass primitives, OpenMP + SIMD.

Every dense primitive is one C++ pass over ``S`` (``csrc/cpu/kernels_impl.h``): rows are
spread over OpenMP threads, the column pass streams ``S`` row-major in tiles of columns,
``exp`` is a vectorized polynomial, and the kernels of the best instruction set this CPU has
(AVX-512, AVX2 or portable) are chosen at run time. No temporary of ``S``'s size is
allocated. Results are bitwise identical for any thread count (the work split depends on
the shape only; partial results are merged in a fixed order).

The streaming forms are derived (``chunked.py``): ``torch.matmul`` (BLAS) computes a chunk
of rows of ``X @ Y.T`` and these dense kernels reduce it, so memory stays O(chunk x M).
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from . import _native
from .spec import ALL, DERIVED, BackendSpec

Tensor = torch.Tensor
#: Threads: a pass over S runs on ``torch.get_num_threads()`` OpenMP threads, except below
#: this many scores, where it runs on one. A small pass takes about a millisecond on one
#: thread; on a machine whose cores are busy, a parallel region waits for every one of its
#: threads to be scheduled, which can take far longer (bench/threads_small.py measures
#: both), while on an idle machine the second thread saves at most half of that
#: millisecond. Results do not depend on the thread count. Read at call time.
SMALL_ELEMENTS = 1 << 20


def threads_for(S: Tensor) -> int:
    """The OpenMP threads of one pass over ``S`` (see :data:`SMALL_ELEMENTS`)."""
    return 1 if S.numel() < SMALL_ELEMENTS else torch.get_num_threads()


def status():
    module, why = _native.load("_C_cpu")
    return module is not None, module is not None, why


def _vec(v: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A contiguous vector of ``dtype`` that the kernel may read (None stays None)."""
    return None if v is None else v.to(dtype).contiguous()


def _ptr(v: Tensor | None) -> int:
    return 0 if v is None else v.data_ptr()


def _unit_columns(S: Tensor) -> Tensor:
    """S itself when the kernels can address it (column stride 1, rows apart), else a
    contiguous copy: e.g. an expanded tensor (row stride 0), which read-only passes accept
    (writing passes refuse it before they get here)."""
    n, m = S.shape
    ok = (m <= 1 or S.stride(1) == 1) and (n <= 1 or S.stride(0) >= m)
    return S if ok else S.contiguous()


class CpuBackend:
    name = "cpu"

    def __init__(self):
        self._C = _native.require("_C_cpu")

    def _head(self, S: Tensor, scale: float):
        return (S.data_ptr(), S.shape[0], S.shape[1], _native.row_stride(S),
                _native.DTYPE_CODES[S.dtype], float(scale))

    def _lse(self, fn, S: Tensor, scale: float, vec: Tensor | None, length: int) -> Tensor:
        # The kernel returns the online state (max, sum); finishing it with torch.log, the
        # log the Sinkhorn driver applies to the masses, makes log(c) - LSE cancel exactly
        # where it should (a single column) rather than differ by one ulp between libms.
        # Where the sum is 0 the max is -inf, and -inf + log(0) = -inf.
        state = torch.empty(2, length, dtype=acc_dtype(S.dtype))
        fn(*self._head(S, scale), _ptr(vec), state[0].data_ptr(), threads_for(S),
           state[1].data_ptr())
        top, total = state
        return top.add_(total.log_())

    def row_lse(self, S: Tensor, scale: float, g: Tensor | None = None) -> Tensor:
        S = _unit_columns(S)
        return self._lse(self._C.row_lse, S, scale, _vec(g, acc_dtype(S.dtype)), S.shape[0])

    def col_lse(self, S: Tensor, scale: float, f: Tensor | None = None) -> Tensor:
        S = _unit_columns(S)
        return self._lse(self._C.col_lse, S, scale, _vec(f, acc_dtype(S.dtype)), S.shape[1])

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        acc = acc_dtype(S.dtype)
        S_in = S
        S = _unit_columns(S)
        vecs = [_vec(v, acc) for v in (f, g, lse_row, lse_col, coef_row, coef_col)]
        y, z = _vec(y, torch.int64), _vec(z, torch.int64)
        # write straight into `out` when it is S itself or has the kernel's layout;
        # otherwise into a buffer that is copied over (e.g. a transposed view)
        target = out
        if out is not None and out is not S_in:
            if out.dtype != S.dtype or (out.shape[1] > 1 and out.stride(1) != 1):
                target = torch.empty(S.shape, dtype=S.dtype)
        elif out is S_in and S is not S_in:
            target = S  # S was made contiguous: write there, copy back below
        ds = self._C.ncl_grad(*self._head(S, scale), *map(_ptr, vecs), _ptr(y), _ptr(z),
                              int(row_offset), _ptr(target),
                              0 if target is None else _native.row_stride(target),
                              threads_for(S))
        if target is not out:
            out.copy_(target)
        return torch.tensor(ds, dtype=acc)

    def apply_biases_(self, S: Tensor, scale: float, f: Tensor | None,
                      g: Tensor | None) -> Tensor:
        acc = acc_dtype(S.dtype)
        work = _unit_columns(S)
        f, g = _vec(f, acc), _vec(g, acc)
        self._C.apply_biases(*self._head(work, scale), _ptr(f), _ptr(g),
                             threads_for(work))
        if work is not S:
            S.copy_(work)
        return S


SPEC = BackendSpec(
    name="cpu",
    devices=lambda: ("cpu",),
    status=status,
    factory=CpuBackend,
    kernels={"row_lse": ALL, "col_lse": ALL, "ncl_grad_": ALL, "apply_biases_": ALL,
             "row_lse_xy": DERIVED, "col_lse_xy": DERIVED, "ncl_grad_xy": DERIVED},
    build="C++17/OpenMP module ncl_kernels._C_cpu (csrc/cpu), always built by pip install",
)
