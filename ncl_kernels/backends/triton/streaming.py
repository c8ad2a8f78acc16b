"""Flash-style Triton kernels on ``S = X @ Y.T``: tiles through ``tl.dot``, never stored.

Embeddings X (N x D) and Y (M x D) in float32, bfloat16 or float16, any strides, any D
(the reduction over D runs in masked blocks of ``BLOCK_D``, so D need not be a power of
two; there is no upper limit, only the cost of more blocks).

Dot precision (the ``PRECISION`` constexpr, ``tl.dot``'s ``input_precision``):

* bfloat16/float16 embeddings: the score tiles run on tensor cores in the storage dtype
  with float32 accumulation; every product of two 8/11-bit mantissas is exact in float32,
  so this matches ``X.float() @ Y.float().T`` up to summation order.
* float32 embeddings and every product with the float32 gradient tile ``G`` use the
  backend's ``dot_precision``: ``"ieee"`` by default (true float32, no tf32), or
  ``"tf32x3"`` (near-float32 accuracy on tensor cores) / ``"tf32"`` (about 1e-3 relative:
  outside SPEC.md's float32 tolerance) when the caller opts in.

Gradient plan (``ncl_grad_xy``): one kernel over row blocks of X accumulates
``dX = scale * G @ Y`` (and the ``sum G * S`` for ``dscale``), one over column blocks of Y
accumulates ``dY = scale * G.T @ X``; each recomputes its tiles of ``S`` and ``G``. The
output D is split over a second grid axis in blocks of ``BLOCK_DO`` to bound the float32
accumulator (registers), at the price of recomputing ``S`` once per output block. Every
tile is computed in the ``X @ Y.T`` orientation, as in ``row_lse_xy``, so the logits of
the gradient round like those of the forward. Nothing is written with atomics: the
result is deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dense import _finish, _online_merge, grad_tile, round_to

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _score_tile(X, Yp, rows, cols, N, M, D, sxn, sxd, syn, syd,
                PRECISION: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``X[rows] @ Y[cols].T`` as a float32 (BLOCK_N, BLOCK_M) tile; 0 outside the matrix.

    ``INTERP`` (Triton's interpreter runs the kernel) turns the operands into float32
    before the dot: the interpreter multiplies the raw uint16 bits of bfloat16 operands.
    Exact: the product of two 16-bit floats is exact in float32, as on the tensor cores.

    The LSE pass and ``target_logits_xy_kernel`` both form logit ``(i, j)`` as entry
    ``(i % BLOCK_N, j % BLOCK_M)`` of this tile for row block ``i // BLOCK_N`` and column
    block ``j // BLOCK_M``, with the same blocks: the same arithmetic, so the same bits,
    also in the interpreter (whose BLAS may round an entry differently elsewhere in a
    tile).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    row_ok = rows < N
    col_ok = cols < M
    xr = X + rows.to(tl.int64)[:, None] * sxn
    yc = Yp + cols.to(tl.int64)[None, :] * syn
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        x = tl.load(xr + ks.to(tl.int64)[None, :] * sxd, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        yt = tl.load(yc + ks.to(tl.int64)[:, None] * syd, mask=k_ok[:, None] & col_ok[None, :],
                     other=0.0)
        if INTERP:
            x = x.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(x, yt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def row_lse_xy_kernel(X, Yp, G, OUT, N, M, D, sxn, sxd, syn, syd, scale,
                      HAS_G: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``LSE_j(scale * <x_i, y_j> + g_j)`` for a block of rows, online over column tiles."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        L = _score_tile(X, Yp, rows, cols, N, M, D, sxn, sxd, syn, syd, PRECISION,
                        INTERP, BLOCK_N, BLOCK_M, BLOCK_D) * scale
        if HAS_G:
            L = L + tl.load(G + cols, mask=col_ok, other=0.0)[None, :]
        L = tl.where(col_ok[None, :], L, NEG_INF)
        m, acc = _online_merge(m, acc, L)
    tl.store(OUT + rows, _finish(m, acc), mask=rows < N)


@triton.jit
def target_logits_xy_kernel(X, Yp, T, OUT, N, M, D, sxn, sxd, syn, syd, scale,
                            PRECISION: tl.constexpr, INTERP: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """``scale * <x_i, y_{t_i}>`` for a block of rows, rounded as ``row_lse_xy_kernel``'s.

    Each target is read off the very tile the LSE pass forms it in (row block x the
    target's column block, same blocks, same position): only the column blocks that
    some row of the block targets are formed (one or two for diagonal-like targets). One
    entry plus zeros is summed per row: exact. A target of -1 gives 0.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.load(T + rows, mask=rows < N, other=-1)
    hit = t >= 0
    cb = tl.where(hit, t // BLOCK_M, -1)
    lo = tl.min(tl.where(hit, cb, 2147483647), axis=0)
    hi = tl.max(cb, axis=0)
    out = tl.zeros((BLOCK_N,), tl.float32)
    for c in range(lo, hi + 1):
        if tl.max((cb == c).to(tl.int32), axis=0) > 0:
            cols = c * BLOCK_M + tl.arange(0, BLOCK_M)
            L = _score_tile(X, Yp, rows, cols, N, M, D, sxn, sxd, syn, syd, PRECISION,
                            INTERP, BLOCK_N, BLOCK_M, BLOCK_D) * scale
            out += tl.sum(tl.where(t[:, None] == cols[None, :], L, 0.0), axis=1)
    tl.store(OUT + rows, out, mask=rows < N)


@triton.jit
def grad_dx_kernel(X, Yp, F, Gp, LSE_R, LSE_C, CR, CC, YT, ZT, DX, DS, N, M, D,
                   sxn, sxd, syn, syd, sdn, sdd, scale,
                   WRITE: tl.constexpr, PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
                   INTERP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    """Rows block x output-D block: ``dX = scale * G @ Y`` and the partial ``sum G * S``."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    f = tl.load(F + rows, mask=row_ok, other=NEG_INF)[:, None]
    lse_r = tl.load(LSE_R + rows, mask=row_ok, other=NEG_INF)[:, None]
    cr = tl.load(CR + rows, mask=row_ok, other=0.0)[:, None]
    yt = tl.load(YT + rows, mask=row_ok, other=-1)[:, None]
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dcols < D
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    ds = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        x = _score_tile(X, Yp, rows, cols, N, M, D, sxn, sxd, syn, syd, PRECISION,
                        INTERP, BLOCK_N, BLOCK_M, BLOCK_D)
        g = tl.load(Gp + cols, mask=col_ok, other=NEG_INF)[None, :]
        lse_c = tl.load(LSE_C + cols, mask=col_ok, other=NEG_INF)[None, :]
        cc = tl.load(CC + cols, mask=col_ok, other=0.0)[None, :]
        zt = tl.load(ZT + cols, mask=col_ok, other=-1)[None, :]
        Gt = grad_tile(x, scale, f, g, lse_r, lse_c, cr, cc, yt == cols[None, :],
                       zt == rows[:, None])
        Gt = tl.where(row_ok[:, None] & col_ok[None, :], Gt, 0.0)
        ds += tl.sum(Gt * x, axis=1)
        if WRITE:
            yo = tl.load(Yp + cols.to(tl.int64)[:, None] * syn + dcols.to(tl.int64)[None, :] * syd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(Gt, yo, acc, input_precision=GRAD_PRECISION)
    # one partial per (row block, output block); the host keeps output block 0's
    tl.store(DS + pid_n * tl.num_programs(1) + pid_d, tl.sum(ds, axis=0))
    if WRITE:
        ptr = DX + rows.to(tl.int64)[:, None] * sdn + dcols.to(tl.int64)[None, :] * sdd
        tl.store(ptr, round_to(acc * scale, DX.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def grad_dy_kernel(X, Yp, F, Gp, LSE_R, LSE_C, CR, CC, YT, ZT, DY, N, M, D,
                   sxn, sxd, syn, syd, sdn, sdd, scale,
                   PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
                   INTERP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    """Column block x output-D block: ``dY = scale * G.T @ X``."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    g = tl.load(Gp + cols, mask=col_ok, other=NEG_INF)[None, :]
    lse_c = tl.load(LSE_C + cols, mask=col_ok, other=NEG_INF)[None, :]
    cc = tl.load(CC + cols, mask=col_ok, other=0.0)[None, :]
    zt = tl.load(ZT + cols, mask=col_ok, other=-1)[None, :]
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dcols < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        x = _score_tile(X, Yp, rows, cols, N, M, D, sxn, sxd, syn, syd, PRECISION,
                        INTERP, BLOCK_N, BLOCK_M, BLOCK_D)
        f = tl.load(F + rows, mask=row_ok, other=NEG_INF)[:, None]
        lse_r = tl.load(LSE_R + rows, mask=row_ok, other=NEG_INF)[:, None]
        cr = tl.load(CR + rows, mask=row_ok, other=0.0)[:, None]
        yt = tl.load(YT + rows, mask=row_ok, other=-1)[:, None]
        Gt = grad_tile(x, scale, f, g, lse_r, lse_c, cr, cc, yt == cols[None, :],
                       zt == rows[:, None])
        Gt = tl.where(row_ok[:, None] & col_ok[None, :], Gt, 0.0)
        xo = tl.load(X + rows.to(tl.int64)[:, None] * sxn + dcols.to(tl.int64)[None, :] * sxd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(Gt), xo, acc, input_precision=GRAD_PRECISION)
    ptr = DY + cols.to(tl.int64)[:, None] * sdn + dcols.to(tl.int64)[None, :] * sdd
    tl.store(ptr, round_to(acc * scale, DY.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])
