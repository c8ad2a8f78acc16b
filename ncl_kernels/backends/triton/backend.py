"""``TritonBackend``: launchers for the kernels of ``dense.py`` and ``streaming.py``.

Storage float32, bfloat16 and float16 run in Triton; float64 (which the GPU's tensor cores
and these kernels do not target) is delegated to the PyTorch backend it inherits from.

Block sizes come from :meth:`TritonBackend._cap`-ed heuristics (not autotuned: autotuning
would recompile per shape and is untestable without a GPU). ``block_cap`` lowers every
block (tests set 16 to force many masked tiles on small inputs); ``dot_precision`` is the
``input_precision`` of every float32 ``tl.dot`` (see ``streaming.py``).

Every launch passes ``enable_fp_fusion=False``: ``s * S + g`` then rounds twice, as in
PyTorch and in the interpreter, so the logits of the LSE passes and of the gradient pass
round identically and ``apply_biases_`` matches PyTorch bit for bit. The elementwise work
is small next to the memory traffic or the dots, so this should cost nothing (not yet
measured on a GPU).

Registers (ptxas -v for sm_90a, Triton 3.9, bfloat16, checked without a GPU): the
gradient kernels at 64 x 64 tiles, ``BLOCK_DO`` = 128 and 8 warps do not spill with
``dot_precision="tf32x3"``; with ``"ieee"`` (float32 FMA dots) they spill about 1.8 KB.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from ..base import Tensor
from ..torch import TorchBackend
from . import dense, interpreting, streaming

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRECISIONS = ("ieee", "tf32x3", "tf32")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _row_stride(S: Tensor) -> int:
    # a single row may carry any stride; only one that keeps rows apart matters
    return S.stride(0) if S.shape[0] > 1 else S.shape[1]


def _vec(v: Optional[Tensor]) -> Optional[Tensor]:
    return None if v is None else v.contiguous()


class TritonBackend(TorchBackend):
    name = "triton"
    #: upper bound on every block size (None: the heuristics' own); at least 16
    block_cap: Optional[int] = None
    #: ``tl.dot`` input_precision for float32 operands: "ieee" (default), "tf32x3", "tf32"
    dot_precision = "ieee"
    #: output-D block of the gradient kernels: S is recomputed ceil(D / grad_block_do)
    #: times per kernel; 256 halves that at D = 512 but spills a little (ptxas -v)
    grad_block_do = 128

    def __init__(self):
        self._sm_count = {}

    # -- launch helpers ------------------------------------------------------------------
    def _cap(self, block: int) -> int:
        return block if self.block_cap is None else max(16, min(block, self.block_cap))

    def _ours(self, t: Tensor) -> bool:
        return t.dtype in _TRITON_DTYPES

    def _device(self, t: Tensor):
        # Triton launches on the current CUDA device: make the tensor's device current
        return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

    def _programs_target(self, t: Tensor) -> int:
        """About four programs per SM keeps every SM busy through the tail."""
        if not t.is_cuda:
            return 2  # the interpreter: just enough to exercise the merge of splits
        idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if idx not in self._sm_count:
            self._sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return 4 * self._sm_count[idx]

    def _precision(self) -> str:
        if self.dot_precision not in _PRECISIONS:
            raise ValueError(f"dot_precision must be one of {_PRECISIONS}; got "
                             f"{self.dot_precision!r}")
        return self.dot_precision

    # -- dense primitives ----------------------------------------------------------------
    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        if not self._ours(S):
            return super().row_lse(S, scale, g)
        N, M = S.shape
        out = torch.empty(N, dtype=torch.float32, device=S.device)
        block_m = self._cap(min(1024, _pow2(M)))
        block_n = self._cap(max(1, 4096 // block_m))
        g = _vec(g)
        with self._device(S):
            dense.row_lse_kernel[(triton.cdiv(N, block_n),)](
                S, S if g is None else g, out, N, M, _row_stride(S), S.stride(1), scale,
                HAS_G=g is not None, BLOCK_N=block_n, BLOCK_M=block_m,
                num_warps=8 if block_m >= 1024 else 4, enable_fp_fusion=False)
        return out

    def col_lse(self, S: Tensor, scale: float, f: Optional[Tensor] = None) -> Tensor:
        if not self._ours(S):
            return super().col_lse(S, scale, f)
        N, M = S.shape
        block_m = self._cap(min(128, _pow2(M)))
        block_n = self._cap(32)
        col_blocks = triton.cdiv(M, block_m)
        max_splits = triton.cdiv(N, block_n)
        splits = max(1, min(max_splits, triton.cdiv(self._programs_target(S), col_blocks)))
        rows_per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
        splits = triton.cdiv(N, rows_per_split)
        part = torch.empty(splits, M, dtype=torch.float32, device=S.device)
        f = _vec(f)
        with self._device(S):
            dense.col_lse_kernel[(col_blocks, splits)](
                S, S if f is None else f, part, N, M, _row_stride(S), S.stride(1), scale,
                rows_per_split, HAS_F=f is not None, BLOCK_N=block_n, BLOCK_M=block_m,
                num_warps=4, enable_fp_fusion=False)
        # logsumexp of all -inf is -inf (an all-masked column stays -inf)
        return part[0] if splits == 1 else torch.logsumexp(part, dim=0)

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        if not self._ours(S):
            return super().ncl_grad_(S, scale, f, g, lse_row, lse_col, coef_row, coef_col,
                                     y, z, out=out, row_offset=row_offset)
        N, M = S.shape
        block_m = self._cap(min(128, _pow2(M)))
        block_n = self._cap(32)
        grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
        part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=S.device)
        target = S if out is None else out
        with self._device(S):
            dense.ncl_grad_kernel[grid](
                S, target, part, _vec(f), _vec(g), _vec(lse_row), _vec(lse_col),
                _vec(coef_row), _vec(coef_col), _vec(y), _vec(z), N, M,
                _row_stride(S), S.stride(1), _row_stride(target), target.stride(1),
                scale, row_offset, WRITE=out is not None, BLOCK_N=block_n, BLOCK_M=block_m,
                num_warps=4, enable_fp_fusion=False)
        return part.sum()

    def apply_biases_(self, S, scale, f=None, g=None):
        if not self._ours(S):
            return super().apply_biases_(S, scale, f, g)
        N, M = S.shape
        block_m = self._cap(min(128, _pow2(M)))
        block_n = self._cap(32)
        f, g = _vec(f), _vec(g)
        grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
        with self._device(S):
            dense.apply_biases_kernel[grid](
                S, S if f is None else f, S if g is None else g, N, M, _row_stride(S),
                S.stride(1), scale, HAS_F=f is not None, HAS_G=g is not None,
                BLOCK_N=block_n, BLOCK_M=block_m, num_warps=4, enable_fp_fusion=False)
        return S

    # -- streaming primitives ------------------------------------------------------------
    def _xy_blocks(self, X: Tensor, D: int):
        """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) for the score tiles."""
        wide = X.dtype == torch.float32  # float32 operands: twice the bytes per tile
        block_d = self._cap(min(32 if wide else 64, _pow2(D)))
        block_n = self._cap(64 if wide else 128)
        block_m = self._cap(64)
        return block_n, block_m, block_d, (4 if wide else 8), 3

    def _args_xy(self, X: Tensor, Y: Tensor):
        return (X.shape[0], Y.shape[0], X.shape[1], X.stride(0), X.stride(1), Y.stride(0),
                Y.stride(1))

    def row_lse_xy(self, X: Tensor, Y: Tensor, scale: float,
                   g: Optional[Tensor] = None) -> Tensor:
        if not self._ours(X):
            return super().row_lse_xy(X, Y, scale, g)
        N, M, D, *strides = self._args_xy(X, Y)
        block_n, block_m, block_d, warps, stages = self._xy_blocks(X, D)
        out = torch.empty(N, dtype=torch.float32, device=X.device)
        g = _vec(g)
        with self._device(X):
            streaming.row_lse_xy_kernel[(triton.cdiv(N, block_n),)](
                X, Y, X if g is None else g, out, N, M, D, *strides, scale,
                HAS_G=g is not None, PRECISION=self._precision(), INTERP=interpreting(),
                BLOCK_N=block_n,
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
                enable_fp_fusion=False)
        return out

    def target_logits_xy(self, X: Tensor, Y: Tensor, scale: float, y: Tensor) -> Tensor:
        if not self._ours(X):
            return super().target_logits_xy(X, Y, scale, y)
        N, M, D, *strides = self._args_xy(X, Y)
        # row_lse_xy's blocks exactly: the target logits round as its score tiles do
        block_n, block_m, block_d, warps, stages = self._xy_blocks(X, D)
        out = torch.empty(N, dtype=torch.float32, device=X.device)
        with self._device(X):
            streaming.target_logits_xy_kernel[(triton.cdiv(N, block_n),)](
                X, Y, _vec(y), out, N, M, D, *strides, scale, PRECISION=self._precision(),
                INTERP=interpreting(), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
                num_warps=warps, num_stages=stages, enable_fp_fusion=False)
        return out

    # col_lse_xy: the inherited ``row_lse_xy(Y, X, scale, f)``, i.e. the same kernel with
    # the roles swapped.

    def ncl_grad_xy(self, X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                    need_dx=True, need_dy=True):
        if not self._ours(X):
            return super().ncl_grad_xy(X, Y, scale, f, g, lse_row, lse_col, coef_row,
                                       coef_col, y, z, need_dx=need_dx, need_dy=need_dy)
        N, M, D, *strides = self._args_xy(X, Y)
        prec = self._precision()
        wide = X.dtype == torch.float32
        block_n = block_m = self._cap(64)
        block_d = self._cap(min(32 if wide else 64, _pow2(D)))
        block_do = self._cap(min(self.grad_block_do, _pow2(D)))
        d_blocks = triton.cdiv(D, block_do)
        vecs = tuple(_vec(v) for v in (f, g, lse_row, lse_col, coef_row, coef_col, y, z))
        dX = torch.empty_like(X, memory_format=torch.contiguous_format) if need_dx else None
        dY = torch.empty_like(Y, memory_format=torch.contiguous_format) if need_dy else None
        blocks = {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_D": block_d,
                  "BLOCK_DO": block_do, "INTERP": interpreting(), "num_warps": 8,
                  "num_stages": 2, "enable_fp_fusion": False}
        # dX (and dscale): when dX is not wanted one program per row block still sums dscale
        gx = (triton.cdiv(N, block_n), d_blocks if need_dx else 1)
        part = torch.empty(gx[0] * gx[1], dtype=torch.float32, device=X.device)
        dx_buf = dX if need_dx else X
        with self._device(X):
            streaming.grad_dx_kernel[gx](
                X, Y, *vecs, dx_buf, part, N, M, D, *strides, dx_buf.stride(0),
                dx_buf.stride(1), scale, WRITE=need_dx, PRECISION=prec, GRAD_PRECISION=prec,
                **blocks)
            if need_dy:
                streaming.grad_dy_kernel[(triton.cdiv(M, block_m), d_blocks)](
                    X, Y, *vecs, dY, N, M, D, *strides, dY.stride(0), dY.stride(1), scale,
                    PRECISION=prec, GRAD_PRECISION=prec, **blocks)
        ds = part.view(gx[0], gx[1])[:, 0].sum()
        return dX, dY, ds
