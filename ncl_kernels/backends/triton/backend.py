"""``TritonBackend``: launchers for the kernels of ``dense.py``, ``streaming.py``, ``grad.py``.

Storage float32, bfloat16 and float16 run in Triton; float64 (which the GPU's tensor cores
and these kernels do not target) is delegated by the registry to the ``torch`` backend
(the ``kernels`` table of ``SPEC`` in ``__init__.py``).

Launch blocks come from the shipped table in ``configs.py`` (no autotuning). An instance
is configured once, by its constructor; the registry's shared instance uses the
defaults, and tests or benchmarks build their own configured instances.

Every launch passes ``enable_fp_fusion=False``: ``s * S + g`` then rounds twice, as in
PyTorch and in the interpreter, so the logits of the LSE passes and of the gradient pass
round identically and ``apply_biases_`` matches PyTorch bit for bit. The elementwise work
is small next to the memory traffic or the dots.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from . import configs, dense, grad, interpreting, streaming

Tensor = torch.Tensor
PRECISIONS = ("tf32x3", "ieee", "tf32")


def _row_stride(S: Tensor) -> int:
    # a single row may carry any stride; only one that keeps rows apart matters
    return S.stride(0) if S.shape[0] > 1 else S.shape[1]


def _vec(v: Optional[Tensor]) -> Optional[Tensor]:
    return None if v is None else v.contiguous()


class TritonBackend:
    """The Triton kernels, configured at construction.

    Args:
        block_cap: upper bound on every block size (at least 16; None: the table's own).
            Tests set 16 to force many masked tiles on small inputs.
        dot_precision: ``tl.dot``'s ``input_precision`` for float32 embeddings (scores and
            gradient products): "tf32x3" (default: near-float32 accuracy on tensor
            cores), "ieee" (float32 FMA dots, slow) or "tf32" (about 1e-3 relative:
            outside the float32 tolerance of docs/math.md section 5).
        grad_split: 16-bit embeddings: multiply the gradient tile into dX/dY as a high
            and a low part (two tensor-core products, the float32 tile's accuracy) rather
            than rounded once (one product; see bench/triton_grad_precision.py).
        grad_block_do: force the gradient kernels' output-D block to this width (a power
            of two >= 16; ``S`` is formed once per block); None: the table's.
        programs: force the number of programs of the persistent kernels (None: sized to
            the device; 2 in the interpreter, enough to exercise the merge of partials).
    """

    name = "triton"

    def __init__(self, *, block_cap: Optional[int] = None, dot_precision: str = "tf32x3",
                 grad_split: bool = True, grad_block_do: Optional[int] = None,
                 programs: Optional[int] = None):
        if block_cap is not None and (not isinstance(block_cap, int) or block_cap < 16):
            raise ValueError(f"block_cap must be None or an int >= 16; got {block_cap!r}")
        if dot_precision not in PRECISIONS:
            raise ValueError(f"dot_precision must be one of {PRECISIONS}; got "
                             f"{dot_precision!r}")
        if grad_block_do is not None and (not isinstance(grad_block_do, int)
                                          or grad_block_do < 16
                                          or grad_block_do & (grad_block_do - 1)):
            raise ValueError(f"grad_block_do must be None or a power of two >= 16; got "
                             f"{grad_block_do!r}")
        if programs is not None and (not isinstance(programs, int) or programs < 1):
            raise ValueError(f"programs must be None or a positive int; got {programs!r}")
        self.block_cap = block_cap
        self.dot_precision = dot_precision
        self.grad_split = bool(grad_split)
        self.grad_block_do = grad_block_do
        self.programs = programs
        # multiprocessor count per device index (ncl_kernels.backends.cuda keeps its own;
        # the shared launch helpers of backends/_native.py are to take both)
        self._sm_count = {}

    # -- launch helpers ------------------------------------------------------------------
    def _device(self, t: Tensor):
        # Triton launches on the current CUDA device: make the tensor's device current
        return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

    def _sms(self, t: Tensor) -> int:
        idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if idx not in self._sm_count:
            self._sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return self._sm_count[idx]

    def _programs(self, t: Tensor, blocks: int, per_sm: int) -> int:
        """Programs of a persistent kernel: ``per_sm`` per multiprocessor, at most one per
        block of work."""
        if self.programs is not None:
            target = self.programs
        elif not t.is_cuda:
            target = 2
        else:
            target = per_sm * self._sms(t)
        return max(1, min(blocks, target))

    def _precision(self, X: Tensor) -> str:
        # 16-bit operands multiply exactly on tensor cores whatever the setting
        return self.dot_precision if X.dtype == torch.float32 else "ieee"

    # -- dense primitives ----------------------------------------------------------------
    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        N, M = S.shape
        out = torch.empty(N, dtype=torch.float32, device=S.device)
        t = configs.row_tiles(S.dtype, M, self.block_cap)
        vec = min(t.block_m, 4 if S.dtype == torch.float32 else 8)
        g = _vec(g)
        grid = (self._programs(S, triton.cdiv(N, t.block_n), 8),)
        with self._device(S):
            dense.row_lse_kernel[grid](
                S, S if g is None else g, out, N, M, _row_stride(S), S.stride(1), scale,
                HAS_G=g is not None, BLOCK_N=t.block_n, BLOCK_M=t.block_m, VEC=vec,
                num_warps=t.warps, num_stages=t.stages, enable_fp_fusion=False)
        return out

    def col_lse(self, S: Tensor, scale: float, f: Optional[Tensor] = None) -> Tensor:
        N, M = S.shape
        t = configs.col_tiles(S.dtype, M, self.block_cap)
        col_blocks = triton.cdiv(M, t.block_m)
        max_splits = triton.cdiv(N, t.block_n)
        target = self._programs(S, max_splits * col_blocks, 8)
        splits = max(1, min(max_splits, triton.cdiv(target, col_blocks)))
        rows_per_split = triton.cdiv(triton.cdiv(N, splits), t.block_n) * t.block_n
        splits = triton.cdiv(N, rows_per_split)
        part = torch.empty(splits, M, dtype=torch.float32, device=S.device)
        f = _vec(f)
        with self._device(S):
            dense.col_lse_kernel[(col_blocks, splits)](
                S, S if f is None else f, part, N, M, _row_stride(S), S.stride(1), scale,
                rows_per_split, HAS_F=f is not None, BLOCK_N=t.block_n, BLOCK_M=t.block_m,
                num_warps=t.warps, num_stages=t.stages, enable_fp_fusion=False)
        # logsumexp of all -inf is -inf (an all-masked column stays -inf)
        return part[0] if splits == 1 else torch.logsumexp(part, dim=0)

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        N, M = S.shape
        t = configs.elementwise_tiles(S.dtype, M, self.block_cap)
        grid = (triton.cdiv(N, t.block_n), triton.cdiv(M, t.block_m))
        part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=S.device)
        target = S if out is None else out
        with self._device(S):
            dense.ncl_grad_kernel[grid](
                S, target, part, _vec(f), _vec(g), _vec(lse_row), _vec(lse_col),
                _vec(coef_row), _vec(coef_col), _vec(y), _vec(z), N, M,
                _row_stride(S), S.stride(1), _row_stride(target), target.stride(1),
                scale, row_offset, WRITE=out is not None, INTERP=interpreting(),
                BLOCK_N=t.block_n, BLOCK_M=t.block_m, num_warps=t.warps,
                num_stages=t.stages, enable_fp_fusion=False)
        return part.sum()

    def apply_biases_(self, S, scale, f=None, g=None):
        N, M = S.shape
        t = configs.elementwise_tiles(S.dtype, M, self.block_cap)
        f, g = _vec(f), _vec(g)
        grid = (triton.cdiv(N, t.block_n), triton.cdiv(M, t.block_m))
        with self._device(S):
            dense.apply_biases_kernel[grid](
                S, S if f is None else f, S if g is None else g, N, M, _row_stride(S),
                S.stride(1), scale, HAS_F=f is not None, HAS_G=g is not None,
                INTERP=interpreting(), BLOCK_N=t.block_n, BLOCK_M=t.block_m,
                num_warps=t.warps, num_stages=t.stages, enable_fp_fusion=False)
        return S

    # -- streaming primitives ------------------------------------------------------------
    def _stream(self, X: Tensor, Y: Tensor):
        """``(args, tiles, constexprs)`` shared by every forward streaming launch."""
        D = X.shape[1]
        t = configs.stream_tiles(X.dtype, D, self.block_cap)
        args = (X.shape[0], Y.shape[0], X.stride(0), X.stride(1), Y.stride(0), Y.stride(1))
        consts = {"D": D, "PRECISION": self._precision(X), "INTERP": interpreting(),
                  "BLOCK_N": t.block_n, "BLOCK_M": t.block_m, "BLOCK_D": t.block_d,
                  "num_warps": t.warps, "num_stages": t.stages, "enable_fp_fusion": False}
        return args, t, consts

    def row_lse_xy(self, X: Tensor, Y: Tensor, scale: float,
                   g: Optional[Tensor] = None) -> Tensor:
        args, t, consts = self._stream(X, Y)
        N = X.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=X.device)
        g = _vec(g)
        grid = (self._programs(X, triton.cdiv(N, t.block_n), 1),)
        with self._device(X):
            streaming.row_lse_xy_kernel[grid](X, Y, X if g is None else g, out, *args, scale,
                                              HAS_G=g is not None, **consts)
        return out

    def col_lse_xy(self, X: Tensor, Y: Tensor, scale: float,
                   f: Optional[Tensor] = None) -> Tensor:
        args, t, consts = self._stream(X, Y)
        M = Y.shape[0]
        out = torch.empty(M, dtype=torch.float32, device=X.device)
        f = _vec(f)
        grid = (self._programs(X, triton.cdiv(M, t.block_m), 1),)
        with self._device(X):
            streaming.col_lse_xy_kernel[grid](X, Y, X if f is None else f, out, *args, scale,
                                              HAS_F=f is not None, **consts)
        return out

    def target_logits_xy(self, X: Tensor, Y: Tensor, scale: float, y: Tensor, z: Tensor):
        args, t, consts = self._stream(X, Y)
        N, M = X.shape[0], Y.shape[0]
        t_row = torch.empty(N, dtype=torch.float32, device=X.device)
        t_col = torch.empty(M, dtype=torch.float32, device=X.device)
        with self._device(X):
            for out, tgt, blocks, cols in ((t_row, y, triton.cdiv(N, t.block_n), False),
                                           (t_col, z, triton.cdiv(M, t.block_m), True)):
                streaming.target_logits_xy_kernel[(blocks,)](
                    X, Y, _vec(tgt), out, *args, scale, COLS=cols, **consts)
        return t_row, t_col

    def sinkhorn_step_xy(self, X: Tensor, Y: Tensor, scale: float, g: Optional[Tensor],
                         log_r: Tensor):
        """One Sinkhorn iteration's streaming work in one launch (plus a small merge).

        Returns ``(f, lse_row, lse_col)`` (the seam's ``sinkhorn_step_xy``): ``lse_row =
        row_lse_xy(X, Y, scale, g)`` (the same kernel arithmetic: the same bits), ``f =
        where(log_r > -inf, log_r - lse_row, -inf)`` (as the driver's potential, bit for
        bit) and ``lse_col`` equal to ``col_lse_xy(X, Y, scale, f)`` up to float32 rounding
        (its partials are merged in another, fixed, order).
        """
        args, t, consts = self._stream(X, Y)
        N, M = X.shape[0], Y.shape[0]
        P = self._programs(X, triton.cdiv(N, t.block_n), 1)
        lse_row = torch.empty(N, dtype=torch.float32, device=X.device)
        f = torch.empty(N, dtype=torch.float32, device=X.device)
        lse_col = torch.empty(M, dtype=torch.float32, device=X.device)
        pm = torch.empty(P, M, dtype=torch.float32, device=X.device)
        ps = torch.empty(P, M, dtype=torch.float32, device=X.device)
        g = _vec(g)
        merge_block = min(1024, configs.pow2(M))
        with self._device(X):
            streaming.sinkhorn_step_xy_kernel[(P,)](
                X, Y, X if g is None else g, _vec(log_r), lse_row, f, pm, ps, *args, scale,
                HAS_G=g is not None, **consts)
            streaming.col_merge_kernel[(triton.cdiv(M, merge_block),)](
                pm, ps, lse_col, P, M, BLOCK_M=merge_block, num_warps=4)
        return f, lse_row, lse_col

    def ncl_grad_xy(self, X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                    need_dx=True, need_dy=True):
        N, M, D = X.shape[0], Y.shape[0], X.shape[1]
        t = configs.grad_tiles(X.dtype, D, self.block_cap)
        block_do, resident = t.block_do, t.resident
        if self.grad_block_do is not None:
            block_do = min(self.grad_block_do, configs.pow2(D))
        d_blocks = triton.cdiv(D, block_do)
        vecs = tuple(_vec(v) for v in (f, g, lse_row, lse_col, coef_row, coef_col, y, z))
        # |G| <= max|coef_row| + max|coef_col|: sets the power of two of the 16-bit G
        cmax = (coef_row.abs().amax() + coef_col.abs().amax()).float().reshape(1) \
            if N and M else torch.ones(1, device=X.device)
        strides = (X.stride(0), X.stride(1), Y.stride(0), Y.stride(1))
        consts = {"D": D, "RESIDENT": resident, "SPLIT": self.grad_split,
                  "PRECISION": self._precision(X), "INTERP": interpreting(),
                  "OWN": t.own, "STREAM": t.stream, "BLOCK_D": t.block_d,
                  "BLOCK_DO": block_do, "D_PAD": configs.pow2(D), "num_warps": t.warps,
                  "num_stages": t.stages, "enable_fp_fusion": False}
        dX = torch.empty_like(X, memory_format=torch.contiguous_format) if need_dx else None
        dY = torch.empty_like(Y, memory_format=torch.contiguous_format) if need_dy else None
        ds = None
        with self._device(X):
            if need_dx or not need_dy:
                # dX (and dscale); without dX, one output block of programs still sums dscale
                gx = (triton.cdiv(N, t.own), d_blocks if need_dx else 1)
                part = torch.empty(gx, dtype=torch.float32, device=X.device)
                buf = dX if need_dx else X
                grad.grad_dx_kernel[gx](
                    X, Y, *vecs, cmax, buf, part, N, M, *strides, buf.stride(0),
                    buf.stride(1), scale, WRITE=need_dx, **consts)
                ds = part[:, 0].sum()
            if need_dy:
                gy = (triton.cdiv(M, t.own), d_blocks)
                part = torch.empty(gy, dtype=torch.float32, device=X.device)
                grad.grad_dy_kernel[gy](
                    X, Y, *vecs, cmax, dY, part, N, M, *strides, dY.stride(0),
                    dY.stride(1), scale, **consts)
                if ds is None:
                    ds = part[:, 0].sum()
        return dX, dY, ds
