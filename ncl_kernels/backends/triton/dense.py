"""Triton kernels for the dense primitives: each is one read of ``S`` (and one write).

Storage float32, bfloat16 or float16, any row stride (columns may be strided too: both
strides are passed). Logits ``L = scale * S`` are formed in float32 in the kernel and never
stored; every expression rounds exactly as the PyTorch backend's does (``(s*S + g) - lse``)
so that a softmax that should be exactly 1 is.

* ``row_lse``: persistent programs over blocks of rows, walking the columns. Each thread
  keeps a running (max, sum) per row for its own vector of columns: a tile costs one
  ``exp`` per element plus one rescale per vector, and the threads' states are merged
  once per row block, not once per tile.
* ``col_lse``: a 2-D grid (column blocks x row splits) sized to the device. Each thread
  owns a vector of columns across every row of a step, so the reduction over rows stays
  within threads; each program returns a partial LSE and a ``logsumexp`` over the (few)
  splits merges them.
* ``ncl_grad``: a 2-D grid of tiles; each writes ``scale * G`` (in place or not) and a
  partial ``sum G * S`` (one float32 per tile, summed afterwards: deterministic).
* ``apply_biases``: a 2-D grid of tiles, ``S <- (s*S + f_i) + g_j`` rounded once.

``INTERP`` (the kernels run in Triton's interpreter) selects the interpreter's stand-ins
for what it does differently from the GPU (``round_to``).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _online_merge(m, acc, x):
    """Merge a tile ``x`` (rows x cols) into the running ``(max m, sum acc)`` per row.

    An all ``-inf`` prefix keeps ``m = -inf, acc = 0``: the shift is taken as 0 then, so no
    ``(-inf) - (-inf)`` is ever formed.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return m_new, acc


@triton.jit
def _online_merge_cols(m, acc, x):
    """``_online_merge`` down the columns of ``x``: no transpose (a shuffle on the GPU)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[None, :]), axis=0)
    return m_new, acc


@triton.jit
def _finish(m, acc):
    """``m + log(acc)``; ``-inf`` for an empty (all-masked) row."""
    # log of a safe operand: both sides of tl.where are evaluated
    lse = tl.where(m == NEG_INF, 0.0, m) + tl.log(tl.where(acc > 0, acc, 1.0))
    return tl.where(acc > 0, lse, NEG_INF)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """``x`` (float32) rounded to nearest-even in ``dtype``, as PyTorch's ``.to`` rounds.

    The GPU's conversion rounds so; Triton's interpreter truncates a float32 -> bfloat16
    cast, so there bfloat16 is rounded by hand on the bits (add half an ulp, ties to even,
    drop the low 16 bits), then cast exactly. Inputs are finite or -inf (both survive:
    -inf's low bits are zero).
    """
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    elif dtype == tl.float32:
        return x
    else:
        return x.to(dtype)


@triton.jit
def row_lse_kernel(S, G, OUT, N, M, stride_n, stride_m, scale, HAS_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr):
    """Row LSE over blocks of ``BLOCK_N`` rows, persistent (a grid sized to the device).

    A step loads a ``(BLOCK_N, BLOCK_M // VEC, VEC)`` tile: the last axis is one thread's
    vector of adjacent columns, so the per-vector max and sum need no other thread.
    """
    LANES: tl.constexpr = BLOCK_M // VEC
    lane = tl.arange(0, LANES)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]
    for b in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = (rows < N)[:, None, None]
        row_ptr = S + rows.to(tl.int64)[:, None, None] * stride_n
        m = tl.full((BLOCK_N, LANES), NEG_INF, tl.float32)
        acc = tl.zeros((BLOCK_N, LANES), tl.float32)
        for start in range(0, M, BLOCK_M):
            cols = start + lane
            col_ok = cols < M
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_m, mask=row_ok & col_ok,
                        other=NEG_INF)
            x = x.to(tl.float32) * scale
            if HAS_G:
                # a 1-D load reshaped: the small vector, not the tile, changes layout
                gc = start + tl.arange(0, BLOCK_M)
                gv = tl.load(G + gc, mask=gc < M, other=NEG_INF)
                x = x + tl.reshape(gv, (LANES, VEC))[None, :, :]
            m_new = tl.maximum(m, tl.max(x, axis=2))
            shift = tl.where(m_new == NEG_INF, 0.0, m_new)
            acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, :, None]), axis=2)
            m = m_new
        top = tl.max(m, axis=1)
        shift = tl.where(top == NEG_INF, 0.0, top)
        total = tl.sum(acc * tl.exp(m - shift[:, None]), axis=1)
        tl.store(OUT + rows, _finish(top, total), mask=rows < N)


@triton.jit
def col_lse_kernel(S, F, OUT, N, M, stride_n, stride_m, scale, rows_per_split,
                   HAS_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Partial LSE over rows ``[split * rows_per_split, ...)`` of a block of columns.

    Loads stay contiguous along M; the running state is one (max, sum) per column.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, N)
    for start in range(lo, hi, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < hi
        ok = row_ok[:, None] & col_ok[None, :]
        ptr = S + rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_m
        x = tl.load(ptr, mask=ok, other=NEG_INF).to(tl.float32) * scale
        if HAS_F:
            x = x + tl.load(F + rows, mask=row_ok, other=NEG_INF)[:, None]
        m, acc = _online_merge_cols(m, acc, x)
    tl.store(OUT + split.to(tl.int64) * M + cols, _finish(m, acc), mask=col_ok)


@triton.jit
def grad_tile(x, scale, f, g, lse_r, lse_c, cr, cc, is_y, is_z):
    """The gradient element of docs/math.md section 3 on a float32 tile of scores ``x``.

    ``f, lse_r, cr`` are (rows, 1), ``g, lse_c, cc`` (1, cols), ``is_y``/``is_z`` the
    target indicators. Shared by the dense kernel and the streaming gradient kernels so
    they cannot drift apart. A softmax whose LSE is ``-inf`` (an all-masked or zero-mass
    line) contributes 0, never NaN: its LSE is replaced by ``+inf`` on the (rows, 1) or
    (1, cols) vector, so every logit minus it is ``-inf`` with no per-element select.
    """
    L = x * scale
    # Lanes outside the matrix carry f, g, lse = -inf (see the loads), so they give 0 too.
    lse_r_ok = tl.where(lse_r == NEG_INF, float("inf"), lse_r)
    lse_c_ok = tl.where(lse_c == NEG_INF, float("inf"), lse_c)
    G = cr * tl.exp((L + g) - lse_r_ok) + cc * tl.exp((L + f) - lse_c_ok)
    G = G - tl.where(is_y, cr, 0.0)
    G = G - tl.where(is_z, cc, 0.0)
    return G


@triton.jit
def ncl_grad_kernel(S, OUT, DS, F, Gp, LSE_R, LSE_C, CR, CC, Y, Z, N, M,
                    stride_n, stride_m, out_stride_n, out_stride_m, scale, row_offset,
                    WRITE: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    ok = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    x = tl.load(S + r64 * stride_n + c64 * stride_m, mask=ok, other=0.0).to(tl.float32)
    f = tl.load(F + rows, mask=row_ok, other=NEG_INF)[:, None]
    lse_r = tl.load(LSE_R + rows, mask=row_ok, other=NEG_INF)[:, None]
    cr = tl.load(CR + rows, mask=row_ok, other=0.0)[:, None]
    yt = tl.load(Y + rows, mask=row_ok, other=-1).to(tl.int32)[:, None]
    g = tl.load(Gp + cols, mask=col_ok, other=NEG_INF)[None, :]
    lse_c = tl.load(LSE_C + cols, mask=col_ok, other=NEG_INF)[None, :]
    cc = tl.load(CC + cols, mask=col_ok, other=0.0)[None, :]
    # the column targets as local rows (-1 - row_offset for none: never a row here)
    zt = (tl.load(Z + cols, mask=col_ok, other=-1) - row_offset).to(tl.int32)[None, :]
    G = grad_tile(x, scale, f, g, lse_r, lse_c, cr, cc, yt == cols[None, :],
                  zt == rows[:, None])
    G = tl.where(ok, G, 0.0)
    # masked (-inf) scores do not depend on the scale: they add nothing to dscale
    part = tl.sum(tl.sum(G * tl.where(x == NEG_INF, 0.0, x), axis=1), axis=0)
    tl.store(DS + pid_n * tl.num_programs(1) + pid_m, part)
    if WRITE:
        optr = OUT + r64 * out_stride_n + c64 * out_stride_m
        tl.store(optr, round_to(G * scale, OUT.dtype.element_ty, INTERP), mask=ok)


@triton.jit
def apply_biases_kernel(S, F, Gp, N, M, stride_n, stride_m, scale,
                        HAS_F: tl.constexpr, HAS_G: tl.constexpr, INTERP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    ok = row_ok[:, None] & col_ok[None, :]
    ptr = S + rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_m
    x = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) * scale
    if HAS_F:
        x = x + tl.load(F + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_G:
        x = x + tl.load(Gp + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(ptr, round_to(x, S.dtype.element_ty, INTERP), mask=ok)
