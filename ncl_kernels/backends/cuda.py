"""CUDA backend (``ncl_kernels._C_cuda``), launched on the caller's current stream.

Every dense primitive has a kernel (``csrc/cuda/``): ``row_lse``, ``col_lse`` (two-stage
over row slabs when M is small), ``ncl_grad_`` (in place or not; the dscale sum is
reduced deterministically, without atomics) and ``apply_biases_``. The streaming
primitives are derived from these (``derived.py``: cuBLAS products of chunks of rows). Nothing here
synchronizes the device: work buffers are allocated with PyTorch's caching allocator on
the current stream, so freeing them on return is stream-ordered and safe.

``backend="auto"`` on CUDA tensors routes here the primitives where these kernels measured
fastest (``registry.ROUTES``, bench/RESULTS.md); ``backend="cuda"`` runs every primitive
here.
"""

from __future__ import annotations

import contextlib

import torch

from .._dtypes import acc_dtype
from . import _native
from ._native import ptr, readable, vec
from .spec import ALL, DERIVED, BackendSpec

Tensor = torch.Tensor


def status():
    module, why = _native.load("_C_cuda")
    if module is None:
        return False, False, why
    if not torch.cuda.is_available():
        return True, False, "no CUDA device is visible to PyTorch"
    if module.device_count() == 0:
        return True, False, "the CUDA runtime finds no device"
    return True, True, ""


class CudaBackend:
    name = "cuda"

    def __init__(self):
        self._C = _native.require("_C_cuda")

    @contextlib.contextmanager
    def _on(self, t: Tensor):
        """Make ``t``'s device current (the module links its own cudart, which launches on
        the calling thread's current device) and yield the current stream's handle."""
        with torch.cuda.device(t.device):
            yield torch.cuda.current_stream(t.device).cuda_stream

    def row_lse(self, S: Tensor, scale: float, g: Tensor | None = None) -> Tensor:
        S = readable(S)
        acc = acc_dtype(S.dtype)
        out = torch.empty(S.shape[0], dtype=acc, device=S.device)
        g = vec(g, acc)
        with self._on(S) as stream:
            self._C.row_lse(**_native.block_args(S, scale), g_ptr=ptr(g), out_ptr=out.data_ptr(),
                            stream=stream)
        return out

    def col_lse(self, S: Tensor, scale: float, f: Tensor | None = None) -> Tensor:
        S = readable(S)
        N, M = S.shape
        acc = acc_dtype(S.dtype)
        out = torch.empty(M, dtype=acc, device=S.device)
        f = vec(f, acc)
        slabs = self._C.col_lse_slabs(N, M, _native.DTYPE_CODES[S.dtype],
                                      _native.sm_count(S.device))
        # per-slab partial (max, sum) of every column; freed on return (stream-ordered)
        work = torch.empty(2 * slabs * M, dtype=acc, device=S.device) if slabs > 1 else None
        with self._on(S) as stream:
            self._C.col_lse(**_native.block_args(S, scale), f_ptr=ptr(f), out_ptr=out.data_ptr(),
                            stream=stream, work_ptr=ptr(work), n_slabs=slabs)
        return out

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        N, M = S.shape
        acc = acc_dtype(S.dtype)
        # the kernel reads f and g unconditionally: zeros stand in for missing ones
        f = vec(f, acc) if f is not None else torch.zeros(N, dtype=acc, device=S.device)
        g = vec(g, acc) if g is not None else torch.zeros(M, dtype=acc, device=S.device)
        vecs = (f, g, vec(lse_row, acc), vec(lse_col, acc), vec(coef_row, acc),
                vec(coef_col, acc), vec(y, torch.int64), vec(z, torch.int64))
        names = ("f_ptr", "g_ptr", "lse_row_ptr", "lse_col_ptr", "coef_row_ptr", "coef_col_ptr",
                 "y_ptr", "z_ptr")
        S = readable(S)  # a copy only if S's rows overlap; then out (if S) gets a temporary
        target = _native.grad_target(S, out)
        ds = torch.empty((), dtype=acc, device=S.device)
        blocks = self._C.ncl_grad_blocks(N, M)
        work = torch.empty(blocks, dtype=acc, device=S.device)  # per-block partial sums
        with self._on(S) as stream:
            self._C.ncl_grad(**_native.block_args(S, scale), **dict(zip(names, map(ptr, vecs))),
                             ds_ptr=ds.data_ptr(), row_offset=int(row_offset),
                             out_ptr=ptr(target),
                             out_row_stride=0 if target is None else _native.row_stride(target),
                             stream=stream, work_ptr=work.data_ptr(), work_capacity=blocks)
        if target is not out:
            out.copy_(target)
        return ds

    def apply_biases_(self, S, scale, f=None, g=None):
        if not _native.rows_ok(S):  # the validation layer refuses such writes before this
            raise ValueError("apply_biases_ cannot write rows that overlap (row stride "
                             f"{S.stride(0)} < {S.shape[1]} columns)")
        acc = acc_dtype(S.dtype)
        f, g = vec(f, acc), vec(g, acc)
        with self._on(S) as stream:
            self._C.apply_biases(**_native.block_args(S, scale), f_ptr=ptr(f), g_ptr=ptr(g),
                                 stream=stream)
        return S


SPEC = BackendSpec(
    name="cuda",
    devices=lambda: ("cuda",),
    status=status,
    factory=CudaBackend,
    kernels={"row_lse": ALL, "col_lse": ALL, "ncl_grad_": ALL, "apply_biases_": ALL,
             "sinkhorn_step": DERIVED, "row_lse_xy": DERIVED, "col_lse_xy": DERIVED,
             "ncl_grad_xy": DERIVED, "sinkhorn_step_xy": DERIVED,
             "target_logits_xy": DERIVED},
    build="CUDA module ncl_kernels._C_cuda (csrc/cuda), built by pip install when nvcc is "
          "found (NCL_CUDA=AUTO|ON|OFF)",
)
