"""C++ CPU backend (``ncl_kernels._C_cpu``): fused one-pass primitives, OpenMP + SIMD.

Every dense primitive is one C++ pass over ``S`` (``csrc/cpu/kernels_impl.h``): rows are
spread over OpenMP threads, the column pass streams ``S`` row-major in tiles of columns,
``exp`` is a vectorized polynomial written per instruction set (AVX-512, AVX2, portable),
and the kernels of the best set this CPU has are chosen at run time. No temporary of
``S``'s size is allocated. Results are bitwise identical for any thread count (the work
split depends on the shape only; partial results are merged in a fixed order).

The gradient pass computes one exponential per element where that is safe: the column
probability is the row probability times ``exp(a_i + b_j)`` with per-row and per-column
factors (``a_i = f_i + LSE_row_i``, ``b_j = -g_j - LSE_col_j``), used when their range
cannot lose a significant term (else two exponentials, as the other backends always do;
both forms meet docs/math.md section 5, tests/test_cpu_fused.py checks them against the
oracle). Beyond the seam, :meth:`CpuBackend.sinkhorn_step` is one whole Sinkhorn
iteration with one read of ``S`` and one exponential per element.

The streaming forms are derived (``derived.py``): ``torch.matmul`` (BLAS) computes a chunk
of rows of ``X @ Y.T`` and these dense kernels reduce it, so memory stays O(chunk x M).
Read-only passes take any row stride, an expanded tensor included (rows the kernels cannot
address are copied first); writing passes refuse overlapping rows before they get here.
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from . import _native
from ._native import ptr, vec
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


def _finish(state: Tensor) -> Tensor:
    # The kernel returns the online state (max, sum); finishing it with torch.log, the log
    # the Sinkhorn driver applies to the masses, makes log(c) - LSE cancel exactly where it
    # should (a single column: the sum is then a count) rather than differ by one ulp
    # between two libms. Where the sum is 0 the max is -inf, and -inf + log(0) = -inf.
    top, total = state
    return top.add_(total.log_())


class CpuBackend:
    name = "cpu"

    def __init__(self):
        self._C = _native.require("_C_cpu")

    def _lse(self, fn, S: Tensor, scale: float, length: int, **vecs) -> Tensor:
        state = torch.empty(2, length, dtype=acc_dtype(S.dtype))
        fn(**_native.block_args(S, scale), **vecs, out_ptr=state[0].data_ptr(),
           sum_ptr=state[1].data_ptr(), n_threads=threads_for(S))
        return _finish(state)

    def row_lse(self, S: Tensor, scale: float, g: Tensor | None = None) -> Tensor:
        S = _native.readable(S)
        g = vec(g, acc_dtype(S.dtype))
        return self._lse(self._C.row_lse, S, scale, S.shape[0], g_ptr=ptr(g))

    def col_lse(self, S: Tensor, scale: float, f: Tensor | None = None) -> Tensor:
        S = _native.readable(S)
        f = vec(f, acc_dtype(S.dtype))
        return self._lse(self._C.col_lse, S, scale, S.shape[1], f_ptr=ptr(f))

    def sinkhorn_step(self, S: Tensor, scale: float, g: Tensor, log_r: Tensor):
        """One Sinkhorn iteration with one read of ``S``: ``(f, lse_row, lse_col)``.

        ``lse_row = LSE_row(g)``, ``f = log_r - lse_row`` (``-inf`` where ``log_r`` is
        ``-inf``, i.e. zero mass), ``lse_col = LSE_col(f)``: what ``row_lse``, the
        potential update and ``col_lse`` give in turn, up to the last bits (the row LSE is
        finished with the C++ log, the column LSE with torch.log). ``g`` and ``log_r`` are
        in the accumulation dtype.
        """
        S = _native.readable(S)
        acc = acc_dtype(S.dtype)
        N, M = S.shape
        g, log_r = vec(g, acc), vec(log_r, acc)
        f = torch.empty(N, dtype=acc)
        lse_row = torch.empty(N, dtype=acc)
        col = torch.empty(2, M, dtype=acc)
        self._C.sinkhorn_step(**_native.block_args(S, scale), g_ptr=g.data_ptr(),
                              log_r_ptr=log_r.data_ptr(), f_ptr=f.data_ptr(),
                              lse_row_ptr=lse_row.data_ptr(), col_max_ptr=col[0].data_ptr(),
                              col_sum_ptr=col[1].data_ptr(), n_threads=threads_for(S))
        return f, lse_row, _finish(col)

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        acc = acc_dtype(S.dtype)
        S = _native.readable(S)
        target = _native.grad_target(S, out)
        # the converted vectors must stay alive through the call: bind them to names
        vecs = [vec(v, acc) for v in (f, g, lse_row, lse_col, coef_row, coef_col)]
        y, z = vec(y, torch.int64), vec(z, torch.int64)
        names = ("f_ptr", "g_ptr", "lse_row_ptr", "lse_col_ptr", "coef_row_ptr", "coef_col_ptr")
        ds = torch.empty((), dtype=acc)
        self._C.ncl_grad(**_native.block_args(S, scale), **dict(zip(names, map(ptr, vecs))),
                         y_ptr=ptr(y), z_ptr=ptr(z), ds_ptr=ds.data_ptr(),
                         row_offset=int(row_offset), out_ptr=ptr(target),
                         out_row_stride=0 if target is None else _native.row_stride(target),
                         n_threads=threads_for(S))
        if target is not out:
            out.copy_(target)
        return ds

    def apply_biases_(self, S: Tensor, scale: float, f: Tensor | None,
                      g: Tensor | None) -> Tensor:
        acc = acc_dtype(S.dtype)
        work = _native.readable(S)
        f, g = vec(f, acc), vec(g, acc)
        self._C.apply_biases(**_native.block_args(work, scale), f_ptr=ptr(f), g_ptr=ptr(g),
                             n_threads=threads_for(work))
        if work is not S:
            S.copy_(work)
        return S


SPEC = BackendSpec(
    name="cpu",
    devices=lambda: ("cpu",),
    status=status,
    factory=CpuBackend,
    kernels={"row_lse": ALL, "col_lse": ALL, "ncl_grad_": ALL, "apply_biases_": ALL,
             "sinkhorn_step": ALL, "row_lse_xy": DERIVED, "col_lse_xy": DERIVED,
             "ncl_grad_xy": DERIVED, "sinkhorn_step_xy": DERIVED,
             "target_logits_xy": DERIVED},
    build="C++17/OpenMP module ncl_kernels._C_cpu (csrc/cpu), always built by pip install",
)
