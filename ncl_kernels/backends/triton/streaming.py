"""Flash-style forward kernels on ``S = X @ Y.T``: score tiles through ``tl.dot``, never stored.

Embeddings X (N x D) and Y (M x D) in float32, bfloat16 or float16, any strides. ``D`` is
a compile-time constant (one compiled kernel per width): the reduction over D runs in
``BLOCK_D`` chunks whose count the compiler knows, and only a ragged last chunk is masked.

Every score tile is ``X[rows] @ Y[cols].T`` for a row block and a column block of the
same ``(BLOCK_N, BLOCK_M)`` grid, in this orientation, formed by ``_tile_step`` chunk by
chunk (configs.py says why the passes share the blocks). Row and column indices are
clamped into the matrix, so the loads need no masks; lanes past the edge are discarded
(logit ``-inf``) before any reduction.

* ``row_lse_xy_kernel`` / ``col_lse_xy_kernel``: persistent programs over row (column)
  blocks; each sweeps the other operand with one flat loop over (tile, D chunk), so the
  software pipeline keeps loading across tile boundaries, and merges each finished tile
  into a running (max, sum).
* ``sinkhorn_step_xy_kernel``: one Sinkhorn iteration in one launch. A row block's LSE
  and its ``f``, then a second sweep over the same Y stream folds the block's column
  partials (max, sum) into its program's row of a partial buffer; ``col_merge_kernel``
  merges the programs' partials in program order (deterministic: no atomics).
* ``target_logits_xy_kernel``: the loss's target logits, read off the very tiles the LSE
  passes form them in.

Dot precision (``PRECISION``, ``tl.dot``'s ``input_precision``): 16-bit operands run on
tensor cores in their dtype with float32 accumulation (the products are exact in float32);
float32 operands use the backend's ``dot_precision`` ("tf32x3" by default: near-float32
accuracy on tensor cores).

``INTERP`` (Triton's interpreter runs the kernel, on CPU tensors) turns 16-bit operands
into float32 before a dot: the interpreter multiplies the raw bits of bfloat16 operands.
Exact, as the products are exact in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dense import _finish, _online_merge, _online_merge_cols

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _load_block(P, idx, ks, stride_n, stride_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``P[idx, ks]`` (``idx`` already clamped); only a ragged last D chunk is masked."""
    ptr = P + idx.to(tl.int64)[:, None] * stride_n + ks.to(tl.int64)[None, :] * stride_d
    if D % BLOCK_D == 0:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=(ks < D)[None, :], other=0.0)


@triton.jit
def _tile_step(X, Yp, rows_c, cols_c, k, acc, sxn, sxd, syn, syd,
               D: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """``acc + X[rows, k:k+BLOCK_D] @ Y[cols, k:k+BLOCK_D].T``: one chunk of a score tile."""
    ks = k + tl.arange(0, BLOCK_D)
    x = _load_block(X, rows_c, ks, sxn, sxd, D, BLOCK_D)
    y = _load_block(Yp, cols_c, ks, syn, syd, D, BLOCK_D)
    if INTERP:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)


@triton.jit
def _tile(X, Yp, rows_c, cols_c, sxn, sxd, syn, syd, D: tl.constexpr,
          PRECISION: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A whole score tile: the chunks of ``_tile_step`` in order, from zero."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k in range(0, D, BLOCK_D):
        acc = _tile_step(X, Yp, rows_c, cols_c, k, acc, sxn, sxd, syn, syd, D, PRECISION,
                         INTERP, BLOCK_D)
    return acc


@triton.jit
def _row_sweep(X, Yp, G, rows_c, M, sxn, sxd, syn, syd, scale, D: tl.constexpr,
               HAS_G: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``LSE_j(scale * <x_i, y_j> + g_j)`` of one row block: one flat loop over (column
    tile, D chunk), each finished tile merged into the running (max, sum)."""
    K_TILES: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for it in range(0, tl.cdiv(M, BLOCK_M) * K_TILES):
        c = it // K_TILES
        kk = it - c * K_TILES
        cols = c * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = _tile_step(X, Yp, rows_c, tl.minimum(cols, M - 1), kk * BLOCK_D, acc,
                         sxn, sxd, syn, syd, D, PRECISION, INTERP, BLOCK_D)
        if kk == K_TILES - 1:
            L = acc * scale
            if HAS_G:
                L = L + tl.load(G + cols, mask=cols < M, other=0.0)[None, :]
            m, s = _online_merge(m, s, tl.where((cols < M)[None, :], L, NEG_INF))
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    return _finish(m, s)


@triton.jit
def row_lse_xy_kernel(X, Yp, G, OUT, N, M, sxn, sxd, syn, syd, scale, D: tl.constexpr,
                      HAS_G: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``LSE_j(scale * <x_i, y_j> + g_j)``: persistent over row blocks."""
    for b in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
        lse = _row_sweep(X, Yp, G, tl.minimum(rows, N - 1), M, sxn, sxd, syn, syd, scale,
                         D, HAS_G, PRECISION, INTERP, BLOCK_N, BLOCK_M, BLOCK_D)
        tl.store(OUT + rows, lse, mask=rows < N)


@triton.jit
def col_lse_xy_kernel(X, Yp, F, OUT, N, M, sxn, sxd, syn, syd, scale, D: tl.constexpr,
                      HAS_F: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``LSE_i(scale * <x_i, y_j> + f_i)``: persistent over column blocks, the tiles in
    the row pass's orientation (``X[rows] @ Y[cols].T``), reduced down their columns."""
    K_TILES: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    n_row = tl.cdiv(N, BLOCK_N)
    for cb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        cols = cb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_c = tl.minimum(cols, M - 1)
        m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
        s = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for it in range(0, n_row * K_TILES):
            r = it // K_TILES
            kk = it - r * K_TILES
            rows = r * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = _tile_step(X, Yp, tl.minimum(rows, N - 1), cols_c, kk * BLOCK_D, acc,
                             sxn, sxd, syn, syd, D, PRECISION, INTERP, BLOCK_D)
            if kk == K_TILES - 1:
                L = acc * scale
                if HAS_F:
                    L = L + tl.load(F + rows, mask=rows < N, other=0.0)[:, None]
                m, s = _online_merge_cols(m, s, tl.where((rows < N)[:, None], L, NEG_INF))
                acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        tl.store(OUT + cols, _finish(m, s), mask=cols < M)


@triton.jit
def sinkhorn_step_xy_kernel(X, Yp, G, LOG_R, LSE_R, F, PM, PS, N, M, sxn, sxd, syn, syd,
                            scale, D: tl.constexpr, HAS_G: tl.constexpr,
                            PRECISION: tl.constexpr, INTERP: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """One Sinkhorn iteration's streaming work, persistent over row blocks.

    Sweep 1 (as ``row_lse_xy_kernel``): ``lse_i = LSE_j(L_ij + g_j)``, then
    ``f_i = log r_i - lse_i`` (``-inf`` where ``log r_i`` is). Sweep 2 over the same Y
    stream: the block's column maxima and sums of ``exp(L_ij + f_i - max)``, folded into
    row ``program_id`` of ``PM``/``PS`` (program p owns its row: its first block writes
    it, the later ones merge into it).
    """
    K_TILES: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    pid = tl.program_id(0)
    n_col = tl.cdiv(M, BLOCK_M)
    part = pid.to(tl.int64) * M
    for b in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_c = tl.minimum(rows, N - 1)
        row_ok = rows < N
        # sweep 1: the row pass's very code, so lse has row_lse_xy_kernel's bits
        lse = _row_sweep(X, Yp, G, rows_c, M, sxn, sxd, syn, syd, scale, D, HAS_G,
                         PRECISION, INTERP, BLOCK_N, BLOCK_M, BLOCK_D)
        log_r = tl.load(LOG_R + rows, mask=row_ok, other=NEG_INF)
        f = tl.where(log_r == NEG_INF, NEG_INF, log_r - lse)
        tl.store(LSE_R + rows, lse, mask=row_ok)
        tl.store(F + rows, f, mask=row_ok)
        f = tl.where(row_ok, f, NEG_INF)
        first = b == pid
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for it in range(0, n_col * K_TILES):
            c = it // K_TILES
            kk = it - c * K_TILES
            cols = c * BLOCK_M + tl.arange(0, BLOCK_M)
            acc = _tile_step(X, Yp, rows_c, tl.minimum(cols, M - 1), kk * BLOCK_D, acc,
                             sxn, sxd, syn, syd, D, PRECISION, INTERP, BLOCK_D)
            if kk == K_TILES - 1:
                col_ok = cols < M
                cm = tl.full((BLOCK_M,), NEG_INF, tl.float32)
                cs = tl.zeros((BLOCK_M,), tl.float32)
                if not first:
                    cm = tl.load(PM + part + cols, mask=col_ok, other=NEG_INF)
                    cs = tl.load(PS + part + cols, mask=col_ok, other=0.0)
                cm, cs = _online_merge_cols(cm, cs, acc * scale + f[:, None])
                tl.store(PM + part + cols, cm, mask=col_ok)
                tl.store(PS + part + cols, cs, mask=col_ok)
                acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)


@triton.jit
def col_merge_kernel(PM, PS, OUT, P, M, BLOCK_M: tl.constexpr):
    """``LSE`` of each column from the ``P`` programs' partials, merged in program order."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    pm_ptr = PM + cols
    ps_ptr = PS + cols
    for _ in range(0, P):
        pm = tl.load(pm_ptr, mask=col_ok, other=NEG_INF)
        ps = tl.load(ps_ptr, mask=col_ok, other=0.0)
        pm_ptr += M   # pointer arithmetic: 64-bit however large P * M
        ps_ptr += M
        m_new = tl.maximum(m, pm)
        shift = tl.where(m_new == NEG_INF, 0.0, m_new)
        s = s * tl.exp(m - shift) + ps * tl.exp(pm - shift)
        m = m_new
    tl.store(OUT + cols, _finish(m, s), mask=col_ok)


@triton.jit
def target_logits_xy_kernel(X, Yp, T, OUT, N, M, sxn, sxd, syn, syd, scale,
                            D: tl.constexpr, COLS: tl.constexpr, PRECISION: tl.constexpr,
                            INTERP: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``scale * <x_i, y_{t_i}>`` per row (``COLS``: ``scale * <x_{t_j}, y_j>`` per
    column), each read off the tile the LSE passes form it in.

    A program takes a block of rows (columns) and forms only the tiles, in the passes'
    grid, that hold some of its targets (one or two for diagonal-like targets); one entry
    plus zeros is summed per line, which is exact. A target of -1 gives 0.
    """
    OTHER: tl.constexpr = BLOCK_N if COLS else BLOCK_M
    if COLS:
        lines = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n_lines = M
    else:
        lines = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_lines = N
    lines_c = tl.minimum(lines, n_lines - 1)
    t = tl.load(T + lines, mask=lines < n_lines, other=-1)
    hit = t >= 0
    blk = tl.where(hit, t // OTHER, -1)
    lo = tl.min(tl.where(hit, blk, 2147483647), axis=0)
    hi = tl.max(blk, axis=0)
    out = tl.zeros(lines.shape, tl.float32)
    for o in range(lo, hi + 1):
        if tl.max((blk == o).to(tl.int32), axis=0) > 0:
            other = o * OTHER + tl.arange(0, OTHER)
            if COLS:
                L = _tile(X, Yp, tl.minimum(other, N - 1), lines_c, sxn, sxd, syn, syd, D,
                          PRECISION, INTERP, BLOCK_N, BLOCK_M, BLOCK_D) * scale
                out += tl.sum(tl.where(other[:, None] == t[None, :], L, 0.0), axis=0)
            else:
                L = _tile(X, Yp, lines_c, tl.minimum(other, M - 1), sxn, sxd, syn, syd, D,
                          PRECISION, INTERP, BLOCK_N, BLOCK_M, BLOCK_D) * scale
                out += tl.sum(tl.where(t[:, None] == other[None, :], L, 0.0), axis=1)
    tl.store(OUT + lines, out, mask=lines < n_lines)
