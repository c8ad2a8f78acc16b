"""CUDA backend (``ncl_kernels._C_cuda``), launched on the caller's current stream.

Every dense primitive has a kernel (``csrc/cuda/``): ``row_lse``, ``col_lse`` (two-stage
over row slabs when M is small), ``ncl_grad_`` (in place or not; the dscale sum is
reduced deterministically, without atomics) and ``apply_biases_``. The streaming
primitives are derived from these (``chunked.py``: cuBLAS products of chunks of rows). Nothing here
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
from .spec import ALL, DERIVED, BackendSpec

Tensor = torch.Tensor

_sm_counts: dict[int, int] = {}


def status():
    module, why = _native.load("_C_cuda")
    if module is None:
        return False, False, why
    if not torch.cuda.is_available():
        return True, False, "no CUDA device is visible to PyTorch"
    if module.device_count() == 0:
        return True, False, "the CUDA runtime finds no device"
    return True, True, ""


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def _vec(v: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A contiguous copy-if-needed of a per-row/per-column vector in ``dtype``."""
    return None if v is None else v.to(dtype).contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _rows_ok(t: Tensor) -> bool:
    """Unit column stride and rows that do not overlap: what the kernels can address."""
    n, m = t.shape
    return (m <= 1 or t.stride(1) == 1) and (n <= 1 or t.stride(0) >= m)


def _readable(S: Tensor) -> Tensor:
    """S itself when the kernels can address it, else a contiguous copy (e.g. an expanded
    tensor with row stride 0)."""
    return S if _rows_ok(S) else S.contiguous()


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
        S = _readable(S)
        out, _g_alive, args = _native.row_lse_call(S, scale, g)
        with self._on(S) as stream:
            self._C.row_lse(*args, stream)
        return out

    def col_lse(self, S: Tensor, scale: float, f: Tensor | None = None) -> Tensor:
        S = _readable(S)
        N, M = S.shape
        acc = acc_dtype(S.dtype)
        code = _native.DTYPE_CODES[S.dtype]
        out = torch.empty(M, dtype=acc, device=S.device)
        f = _vec(f, acc)
        slabs = self._C.col_lse_slabs(N, M, code, _sm_count(S.device))
        # per-slab partial (max, sum) of every column; freed on return (stream-ordered)
        work = torch.empty(2 * slabs * M, dtype=acc, device=S.device) if slabs > 1 else None
        with self._on(S) as stream:
            self._C.col_lse(S.data_ptr(), N, M, _native.row_stride(S), code, float(scale),
                            _ptr(f), out.data_ptr(), _ptr(work), slabs, stream)
        return out

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        N, M = S.shape
        acc = acc_dtype(S.dtype)
        # the kernel reads f and g unconditionally: zeros stand in for missing ones
        f = _vec(f, acc) if f is not None else torch.zeros(N, dtype=acc, device=S.device)
        g = _vec(g, acc) if g is not None else torch.zeros(M, dtype=acc, device=S.device)
        lse_row, lse_col = _vec(lse_row, acc), _vec(lse_col, acc)
        coef_row, coef_col = _vec(coef_row, acc), _vec(coef_col, acc)
        y, z = y.to(torch.int64).contiguous(), z.to(torch.int64).contiguous()

        # The kernel writes S's dtype into rows it can address, either S itself (each
        # element is read before it is written) or a block that does not overlap S.
        # Anything else gets a temporary that is copied over afterwards.
        target = out
        S = _readable(S)  # a copy only if S's rows overlap; then out (if S) gets a temporary
        if out is not None and not (out.dtype == S.dtype and _rows_ok(out)):
            target = torch.empty(S.shape, dtype=S.dtype, device=S.device)
        ds = torch.empty((), dtype=acc, device=S.device)
        blocks = self._C.ncl_grad_blocks(N, M)
        work = torch.empty(blocks, dtype=acc, device=S.device)  # per-block partial sums
        with self._on(S) as stream:
            self._C.ncl_grad(S.data_ptr(), N, M, _native.row_stride(S),
                             _native.DTYPE_CODES[S.dtype], float(scale), f.data_ptr(),
                             g.data_ptr(), lse_row.data_ptr(), lse_col.data_ptr(),
                             coef_row.data_ptr(), coef_col.data_ptr(), y.data_ptr(),
                             z.data_ptr(), int(row_offset), _ptr(target),
                             0 if target is None else _native.row_stride(target),
                             ds.data_ptr(), work.data_ptr(), blocks, stream)
        if target is not out:
            out.copy_(target)
        return ds

    def apply_biases_(self, S, scale, f=None, g=None):
        if not _rows_ok(S):  # the validation layer refuses such writes before this
            raise ValueError("apply_biases_ cannot write rows that overlap (row stride "
                             f"{S.stride(0)} < {S.shape[1]} columns)")
        N, M = S.shape
        acc = acc_dtype(S.dtype)
        f, g = _vec(f, acc), _vec(g, acc)
        with self._on(S) as stream:
            self._C.apply_biases(S.data_ptr(), N, M, _native.row_stride(S),
                                 _native.DTYPE_CODES[S.dtype], float(scale), _ptr(f), _ptr(g),
                                 stream)
        return S


SPEC = BackendSpec(
    name="cuda",
    devices=lambda: ("cuda",),
    status=status,
    factory=CudaBackend,
    kernels={"row_lse": ALL, "col_lse": ALL, "ncl_grad_": ALL, "apply_biases_": ALL,
             "row_lse_xy": DERIVED, "col_lse_xy": DERIVED, "ncl_grad_xy": DERIVED},
    build="CUDA module ncl_kernels._C_cuda (csrc/cuda), built by pip install when nvcc is "
          "found (NCL_CUDA=AUTO|ON|OFF)",
)
