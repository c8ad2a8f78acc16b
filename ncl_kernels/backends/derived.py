"""Primitives derived from others, for backends that mark an entry ``DERIVED``.

* The streaming primitives, from the dense ones, a chunk of rows at a time: a chunk of
  rows of ``S = X @ Y.T`` is multiplied with ``torch.matmul`` (BLAS on the CPU, cuBLAS on a
  GPU) into a buffer of at most ``CHUNK_ELEMS`` elements, reduced by the dense primitive,
  and merged. Memory stays O((N + M) D + chunk). The chunked PyTorch backend walks its
  dense passes with the same budget.
* A Sinkhorn iteration (``sinkhorn_step``, ``sinkhorn_step_xy``) as a row pass, the
  potential update and a column pass: two reads of S where a fused kernel needs one.
* The targets' logits on embeddings (``target_logits_xy``) as elementwise products: what
  BLAS-chunked streaming forms bit for bit where it matters (a backend whose tiles round
  differently, Triton, reads them off its own tiles instead).

The registry resolves the primitives a derived one is built from under the same backend
name as the call (so ``auto``'s derived step runs ``auto``'s row and column routes).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch

from .._dtypes import acc_dtype

Tensor = torch.Tensor

#: elements of the largest temporary a chunked primitive allocates (rows x columns);
#: read at call time, so tests lower it to force many chunks on small inputs.
CHUNK_ELEMS = 1 << 22


def row_chunks(n_rows: int, n_cols: int, budget: Optional[int] = None
               ) -> Iterator[Tuple[int, int]]:
    """Split ``n_rows`` into ranges whose ``rows * n_cols`` stays within ``budget``
    elements (default :data:`CHUNK_ELEMS`)."""
    step = max(1, (CHUNK_ELEMS if budget is None else budget) // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def row_lse_xy(row_lse: Callable, X: Tensor, Y: Tensor, scale: float,
               g: Optional[Tensor] = None) -> Tensor:
    """``LSE_row(g)`` of ``scale * X @ Y.T`` from the dense ``row_lse(S, scale, g)``."""
    acc = acc_dtype(X.dtype)
    Ya = Y.to(acc)
    out = torch.empty(X.shape[0], dtype=acc, device=X.device)
    for start, stop in row_chunks(X.shape[0], Y.shape[0]):
        # the chunk of S is a temporary of this statement: one chunk alive at a time
        out[start:stop] = row_lse(X[start:stop].to(acc) @ Ya.T, scale, g)
    return out


def col_lse_xy(row_lse: Callable, X: Tensor, Y: Tensor, scale: float,
               f: Optional[Tensor] = None) -> Tensor:
    """LSE over the rows of ``X @ Y.T`` is LSE over the columns of ``Y @ X.T``."""
    return row_lse_xy(row_lse, Y, X, scale, f)


def ncl_grad_xy(ncl_grad_: Callable, X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col,
                y, z, need_dx=True, need_dy=True):
    """``(dX, dY, dscale_sum)`` from the dense in-place ``ncl_grad_``.

    Each chunk buffer of ``S`` becomes ``scale * G`` in place, then feeds the two
    products ``dX = G @ Y`` and ``dY += G.T @ X``. ``dX``/``dY`` come back in X's/Y's
    dtype (``None`` when not needed); the third value is ``sum_ij G_ij S_ij`` in the
    accumulation dtype.
    """
    acc = acc_dtype(X.dtype)
    Xa, Ya = X.to(acc), Y.to(acc)
    dX = torch.empty_like(Xa) if need_dx else None
    dY = torch.zeros_like(Ya) if need_dy else None
    ds = torch.zeros((), dtype=acc, device=X.device)
    for start, stop in row_chunks(X.shape[0], Y.shape[0]):
        S = Xa[start:stop] @ Ya.T
        ds += ncl_grad_(S, scale, f[start:stop], g, lse_row[start:stop], lse_col,
                        coef_row[start:stop], coef_col, y[start:stop], z, out=S,
                        row_offset=start)
        if need_dx:
            torch.matmul(S, Ya, out=dX[start:stop])
        if need_dy:
            dY.addmm_(S.T, Xa[start:stop])
        del S  # free this chunk before the next one is multiplied
    return (None if dX is None else dX.to(X.dtype),
            None if dY is None else dY.to(Y.dtype), ds)


def iteration(row: Callable, col: Callable, g: Tensor, log_r: Tensor):
    """One Sinkhorn iteration from ``g`` given its two passes, ``row(g) = LSE_row(g)`` and
    ``col(f) = LSE_col(f)``: ``(f, LSE_row(g), LSE_col(f))`` with ``f = log_r - LSE_row(g)``
    (``-inf`` where ``log_r`` is: zero mass removes the row, never (-inf) - (-inf) = NaN).
    The fused kernels return the same."""
    lse_row = row(g)
    f = torch.where(log_r > float("-inf"), log_r - lse_row,
                    torch.full_like(lse_row, float("-inf")))
    return f, lse_row, col(f)


def sinkhorn_step(row_lse: Callable, col_lse: Callable, S: Tensor, scale: float, g: Tensor,
                  log_r: Tensor):
    """:func:`iteration` on a score matrix, from its dense row and column passes."""
    return iteration(lambda g_: row_lse(S, scale, g_), lambda f_: col_lse(S, scale, f_), g,
                     log_r)


def sinkhorn_step_xy(row_lse_xy: Callable, col_lse_xy: Callable, X: Tensor, Y: Tensor,
                     scale: float, g: Tensor, log_r: Tensor):
    """:func:`iteration` on ``S = X @ Y.T``, from its streaming passes."""
    return iteration(lambda g_: row_lse_xy(X, Y, scale, g_),
                     lambda f_: col_lse_xy(X, Y, scale, f_), g, log_r)


def target_logits_xy(X: Tensor, Y: Tensor, scale: float, y: Tensor, z: Tensor):
    """``(scale * <x_i, y_{y_i}>, scale * <x_{z_j}, y_j>)`` in the accumulation dtype (any
    finite value where a target is -1): O((N + M) D)."""
    acc = acc_dtype(X.dtype)
    Xa, Ya = X.to(acc), Y.to(acc)
    return ((Xa * Ya[y.clamp(min=0)]).sum(1) * scale,
            (Xa[z.clamp(min=0)] * Ya).sum(1) * scale)
