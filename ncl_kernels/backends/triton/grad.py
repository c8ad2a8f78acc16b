"""The streaming gradient on tensor cores: ``dX = s G Y``, ``dY = s G^T X``, ``sum G * S``.

FlashAttention-2's plan: one kernel over row blocks produces dX (and the partial sums
``sum G * S`` for dscale), one over column blocks produces dY; each forms every score
tile ``X[rows] @ Y[cols].T`` once (``S`` is formed twice in all), evaluates the gradient
tile ``G`` (``dense.grad_tile``) and multiplies it into its accumulator. Nothing is
written with atomics: the result is deterministic.

Each program owns ``OWN`` rows (dX) or columns (dY) and streams the other side in blocks
of ``STREAM``; its float32 accumulator covers an output block of ``BLOCK_DO`` of D, the
output D split over the grid's second axis (registers bound the accumulator: 128 x 256
float32 is half of an SM's register file), so ``S`` is formed ``ceil(D / BLOCK_DO)``
times per kernel.

* ``RESIDENT`` (16-bit embeddings, padded D <= 512): the program's own block (``OWN x
  D``) is loaded once and stays in shared memory; each streamed block (``STREAM x D``)
  gives the score tile in one dot over the padded D and, when one output block covers D,
  is also the operand of the product with ``G``. The dY kernel forms ``S^T = Y X^T``
  directly, so that ``G^T`` is born in the layout the next product takes.
* otherwise (float32, padded D > 512): the score tile in ``X @ Y.T`` orientation from
  ``BLOCK_D`` chunks (as the forward kernels form it), the output block's operand loaded
  beside it.

``G`` products (16-bit embeddings): ``G`` is scaled by a power of two that puts its bound
``max|coef_row| + max|coef_col|`` near 2^12 (float16's range holds it; bfloat16 does not
care), rounded to the embeddings' dtype and multiplied on tensor cores with float32
accumulation; with ``SPLIT`` the rounding residual is rounded and multiplied too (two
products: the float32 ``G``'s accuracy; bench/triton_grad_precision.py measures both
against the float64 oracle). float32 embeddings: ``G`` and the operands in the backend's
``dot_precision`` ("tf32x3" by default).

The score tiles round as the forward's do: the same chunks, or, on 16-bit operands, one
dot that the tensor cores run as the same sequence of k-steps of exact products (in
either orientation), so a softmax over one entry is exactly 1 here too. Under ``INTERP``
the score tiles are always formed in ``X @ Y.T`` chunks: the interpreter's one big
matmul would sum in another order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dense import grad_tile, round_to
from .streaming import _load_block, _tile

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _g_scale(CMAX):
    """``(2^k, 2^-k)`` with ``2^k * max|G| ~ 2^12``, exact powers of two built from the
    exponent bits of ``CMAX`` (clamped so that both stay normal)."""
    e = (tl.load(CMAX).to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(e, 13), 241)
    return (((266 - e) << 23).to(tl.float32, bitcast=True),
            ((e - 12) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _g_dot(Gt, B, acc, gs, TRANS: tl.constexpr, SPLIT: tl.constexpr,
           PRECISION: tl.constexpr, INTERP: tl.constexpr):
    """``acc + G @ B`` (``TRANS``: ``G.T @ B``) on tensor cores, in B's dtype."""
    dt: tl.constexpr = B.dtype
    if dt == tl.float32:
        a = tl.trans(Gt) if TRANS else Gt
        return tl.dot(a, B, acc, input_precision=PRECISION)
    else:
        Gs = Gt * gs
        hi = round_to(Gs, dt, INTERP)
        a = tl.trans(hi) if TRANS else hi
        b = B
        if INTERP:
            a = a.to(tl.float32)
            b = B.to(tl.float32)
        acc = tl.dot(a, b, acc)
        if SPLIT:
            lo = round_to(Gs - hi.to(tl.float32), dt, INTERP)
            a = tl.trans(lo) if TRANS else lo
            if INTERP:
                a = a.to(tl.float32)
            acc = tl.dot(a, b, acc)
        return acc


@triton.jit
def grad_dx_kernel(X, Yp, F, Gp, LSE_R, LSE_C, CR, CC, YT, ZT, CMAX, DX, DS, N, M,
                   sxn, sxd, syn, syd, sdn, sdd, scale, D: tl.constexpr,
                   WRITE: tl.constexpr, RESIDENT: tl.constexpr, SPLIT: tl.constexpr,
                   PRECISION: tl.constexpr, INTERP: tl.constexpr, OWN: tl.constexpr,
                   STREAM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                   D_PAD: tl.constexpr):
    """Row block x output-D block: ``dX = scale * G @ Y`` and the partial ``sum G * S``."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * OWN + tl.arange(0, OWN)
    row_ok = rows < N
    rows_c = tl.minimum(rows, N - 1)
    f = tl.load(F + rows, mask=row_ok, other=NEG_INF)[:, None]
    lse_r = tl.load(LSE_R + rows, mask=row_ok, other=NEG_INF)[:, None]
    cr = tl.load(CR + rows, mask=row_ok, other=0.0)[:, None]
    yt = tl.load(YT + rows, mask=row_ok, other=-1).to(tl.int32)[:, None]
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    FULL: tl.constexpr = RESIDENT and not INTERP
    if FULL:
        xb = _load_block(X, rows_c, tl.arange(0, D_PAD), sxn, sxd, D, D_PAD)
    gs, inv_gs = 1.0, 1.0
    if WRITE and X.dtype.element_ty != tl.float32:
        gs, inv_gs = _g_scale(CMAX)
    acc = tl.zeros((OWN, BLOCK_DO), tl.float32)
    ds = tl.zeros((OWN,), tl.float32)
    for start in range(0, M, STREAM):
        cols = start + tl.arange(0, STREAM)
        col_ok = cols < M
        cols_c = tl.minimum(cols, M - 1)
        if FULL:
            yc = _load_block(Yp, cols_c, tl.arange(0, D_PAD), syn, syd, D, D_PAD)
            x = tl.dot(xb, tl.trans(yc), input_precision=PRECISION)
            if WRITE:
                if BLOCK_DO == D_PAD:
                    yo = yc
                else:
                    yo = _load_block(Yp, cols_c, dcols, syn, syd, D, BLOCK_DO)
        else:
            if WRITE:
                yo = _load_block(Yp, cols_c, dcols, syn, syd, D, BLOCK_DO)
            x = _tile(X, Yp, rows_c, cols_c, sxn, sxd, syn, syd, D, PRECISION, INTERP,
                      OWN, STREAM, BLOCK_D)
        g = tl.load(Gp + cols, mask=col_ok, other=NEG_INF)[None, :]
        lse_c = tl.load(LSE_C + cols, mask=col_ok, other=NEG_INF)[None, :]
        cc = tl.load(CC + cols, mask=col_ok, other=0.0)[None, :]
        zt = tl.load(ZT + cols, mask=col_ok, other=-1).to(tl.int32)[None, :]
        Gt = grad_tile(x, scale, f, g, lse_r, lse_c, cr, cc, yt == cols[None, :],
                       zt == rows[:, None])
        Gt = tl.where(row_ok[:, None] & col_ok[None, :], Gt, 0.0)
        ds += tl.sum(Gt * x, axis=1)
        if WRITE:
            acc = _g_dot(Gt, yo, acc, gs, False, SPLIT, PRECISION, INTERP)
    # one partial per (row block, output block); the host keeps output block 0's
    tl.store(DS + pid_n * tl.num_programs(1) + pid_d, tl.sum(ds, axis=0))
    if WRITE:
        ptr = DX + rows.to(tl.int64)[:, None] * sdn + dcols.to(tl.int64)[None, :] * sdd
        tl.store(ptr, round_to(acc * (scale * inv_gs), DX.dtype.element_ty, INTERP),
                 mask=row_ok[:, None] & (dcols < D)[None, :])


@triton.jit
def grad_dy_kernel(X, Yp, F, Gp, LSE_R, LSE_C, CR, CC, YT, ZT, CMAX, DY, DS, N, M,
                   sxn, sxd, syn, syd, sdn, sdd, scale, D: tl.constexpr,
                   RESIDENT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                   INTERP: tl.constexpr, OWN: tl.constexpr, STREAM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, D_PAD: tl.constexpr):
    """Column block x output-D block: ``dY = scale * G.T @ X`` (and, per column block,
    the partial ``sum G * S``, which the host reads when dX is not wanted)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_m * OWN + tl.arange(0, OWN)
    col_ok = cols < M
    cols_c = tl.minimum(cols, M - 1)
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    FULL: tl.constexpr = RESIDENT and not INTERP
    if FULL:
        # the tile is S^T (columns x rows): column vectors down, row vectors across
        yb = _load_block(Yp, cols_c, tl.arange(0, D_PAD), syn, syd, D, D_PAD)
        g = tl.load(Gp + cols, mask=col_ok, other=NEG_INF)[:, None]
        lse_c = tl.load(LSE_C + cols, mask=col_ok, other=NEG_INF)[:, None]
        cc = tl.load(CC + cols, mask=col_ok, other=0.0)[:, None]
        zt = tl.load(ZT + cols, mask=col_ok, other=-1).to(tl.int32)[:, None]
    else:
        g = tl.load(Gp + cols, mask=col_ok, other=NEG_INF)[None, :]
        lse_c = tl.load(LSE_C + cols, mask=col_ok, other=NEG_INF)[None, :]
        cc = tl.load(CC + cols, mask=col_ok, other=0.0)[None, :]
        zt = tl.load(ZT + cols, mask=col_ok, other=-1).to(tl.int32)[None, :]
    gs, inv_gs = 1.0, 1.0
    if X.dtype.element_ty != tl.float32:
        gs, inv_gs = _g_scale(CMAX)
    acc = tl.zeros((OWN, BLOCK_DO), tl.float32)
    ds = tl.zeros((OWN,), tl.float32)
    for start in range(0, N, STREAM):
        rows = start + tl.arange(0, STREAM)
        row_ok = rows < N
        rows_c = tl.minimum(rows, N - 1)
        if FULL:
            xr = _load_block(X, rows_c, tl.arange(0, D_PAD), sxn, sxd, D, D_PAD)
            if BLOCK_DO == D_PAD:
                xo = xr
            else:
                xo = _load_block(X, rows_c, dcols, sxn, sxd, D, BLOCK_DO)
            x = tl.dot(yb, tl.trans(xr), input_precision=PRECISION)
            f = tl.load(F + rows, mask=row_ok, other=NEG_INF)[None, :]
            lse_r = tl.load(LSE_R + rows, mask=row_ok, other=NEG_INF)[None, :]
            cr = tl.load(CR + rows, mask=row_ok, other=0.0)[None, :]
            yt = tl.load(YT + rows, mask=row_ok, other=-1).to(tl.int32)[None, :]
            Gt = grad_tile(x, scale, f, g, lse_r, lse_c, cr, cc, yt == cols[:, None],
                           zt == rows[None, :])
            Gt = tl.where(col_ok[:, None] & row_ok[None, :], Gt, 0.0)
            ds += tl.sum(Gt * x, axis=1)
            acc = _g_dot(Gt, xo, acc, gs, False, SPLIT, PRECISION, INTERP)
        else:
            xo = _load_block(X, rows_c, dcols, sxn, sxd, D, BLOCK_DO)
            x = _tile(X, Yp, rows_c, cols_c, sxn, sxd, syn, syd, D, PRECISION, INTERP,
                      STREAM, OWN, BLOCK_D)
            f = tl.load(F + rows, mask=row_ok, other=NEG_INF)[:, None]
            lse_r = tl.load(LSE_R + rows, mask=row_ok, other=NEG_INF)[:, None]
            cr = tl.load(CR + rows, mask=row_ok, other=0.0)[:, None]
            yt = tl.load(YT + rows, mask=row_ok, other=-1).to(tl.int32)[:, None]
            Gt = grad_tile(x, scale, f, g, lse_r, lse_c, cr, cc, yt == cols[None, :],
                           zt == rows[:, None])
            Gt = tl.where(row_ok[:, None] & col_ok[None, :], Gt, 0.0)
            ds += tl.sum(Gt * x, axis=0)
            acc = _g_dot(Gt, xo, acc, gs, True, SPLIT, PRECISION, INTERP)
    tl.store(DS + pid_m * tl.num_programs(1) + pid_d, tl.sum(ds, axis=0))
    ptr = DY + cols.to(tl.int64)[:, None] * sdn + dcols.to(tl.int64)[None, :] * sdd
    tl.store(ptr, round_to(acc * (scale * inv_gs), DY.dtype.element_ty, INTERP),
             mask=col_ok[:, None] & (dcols < D)[None, :])
