"""The NCL loss (SPEC.md section 3): forward from LSE passes, backward in one pass.

The dense and the embedding forms share the bias solve, the loss assembly and the
coefficients; they differ only in which primitives read the scores. Biases are constants
for the gradient (stop-gradient), as in the method.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import _validate as V
from .backends import get as get_backend
from .backends.base import Backend, acc_dtype
from .sinkhorn import solve

Tensor = torch.Tensor


class _Forward(NamedTuple):
    f: Tensor
    g: Tensor
    lse_row: Tensor
    lse_col: Tensor


def _biases_and_lses(row_lse, col_lse, r, c, n_iters, f, g) -> _Forward:
    """``f, g`` (solved unless given) with ``LSE_row(g)`` and ``LSE_col(f)``.

    After a solve, the last column pass already holds ``LSE_col(f)`` and the closing row
    pass ``LSE_row(g)``, so the forward costs no pass beyond the Sinkhorn iterations.
    """
    if f is None:
        sol = solve(row_lse, col_lse, r, c, n_iters=n_iters, tol=None, check_every=1)
        f, g, lse_row, lse_col = sol.f, sol.g, sol.lse_row, sol.lse_col
    else:
        lse_row, lse_col = row_lse(g), None
    if lse_col is None:
        lse_col = col_lse(f)
    return _Forward(f, g, lse_row, lse_col)


def _coefficients(y: Tensor, z: Tensor, weights: Tuple[float, float], acc) -> Tuple[Tensor, Tensor]:
    """Per-row ``w_row / |R|`` and per-column ``w_col / |C|`` (0 without a target).

    An empty R (or C) contributes 0 to the loss: the mean over no terms is taken as 0.
    """
    has_y, has_z = (y >= 0).to(acc), (z >= 0).to(acc)
    coef_row = has_y * (weights[0] / has_y.sum().clamp(min=1))
    coef_col = has_z * (weights[1] / has_z.sum().clamp(min=1))
    return coef_row, coef_col


def _assemble(fw: _Forward, t_row: Tensor, t_col: Tensor, y: Tensor, z: Tensor,
              coef_row: Tensor, coef_col: Tensor) -> Tensor:
    """``sum_R coef (LSE_row - L_iy - g_y) + sum_C coef (LSE_col - L_zj - f_z)``."""
    zero = torch.zeros((), dtype=t_row.dtype, device=t_row.device)
    row_terms = fw.lse_row - t_row - fw.g[y.clamp(min=0)]
    col_terms = fw.lse_col - t_col - fw.f[z.clamp(min=0)]
    # rows/columns without a target may hold anything (even inf); keep them out of the sum
    return (torch.where(y >= 0, coef_row * row_terms, zero).sum()
            + torch.where(z >= 0, coef_col * col_terms, zero).sum())


def _scale_grad(ctx, index: int, ds: Tensor) -> Optional[Tensor]:
    """``dloss/dscale`` for a tensor scale at input ``index`` (None when not wanted)."""
    return ds.to(*ctx.scale_meta) if ctx.needs_input_grad[index] else None


class _DenseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, scale_t, s, be: Backend, r, c, y, z, n_iters, f, g, weights,
                inplace):
        acc = acc_dtype(S.dtype)
        fw = _biases_and_lses(lambda g_: be.row_lse(S, s, g_), lambda f_: be.col_lse(S, s, f_),
                              r, c, n_iters, f, g)
        coef_row, coef_col = _coefficients(y, z, weights, acc)
        rows, cols = torch.arange(S.shape[0], device=S.device), torch.arange(S.shape[1],
                                                                            device=S.device)
        t_row = S[rows, y.clamp(min=0)].to(acc) * s
        t_col = S[z.clamp(min=0), cols].to(acc) * s
        loss = _assemble(fw, t_row, t_col, y, z, coef_row, coef_col)
        ctx.save_for_backward(S, fw.f, fw.g, fw.lse_row, fw.lse_col, coef_row, coef_col, y, z)
        ctx.s, ctx.be, ctx.inplace = s, be, inplace
        ctx.scale_meta = None if scale_t is None else (scale_t.device, scale_t.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        S, f, g, lse_row, lse_col, coef_row, coef_col, y, z = ctx.saved_tensors
        need_S = ctx.needs_input_grad[0]
        out = None
        if need_S:
            out = S if ctx.inplace else torch.empty(S.shape, dtype=S.dtype, device=S.device)
        ds = ctx.be.ncl_grad_(S, ctx.s, f, g, lse_row, lse_col, coef_row * grad_loss,
                              coef_col * grad_loss, y, z, out=out)
        # a fresh alias of S (not S itself, which autograd and the caller still hold): only a
        # gradient tensor nobody else references is stored as .grad without a copy
        if out is S:
            out = out.detach()
        return (out, _scale_grad(ctx, 1, ds)) + (None,) * 11


class _EmbeddingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, Y, scale_t, s, be: Backend, r, c, y, z, n_iters, f, g, weights):
        acc = acc_dtype(X.dtype)
        fw = _biases_and_lses(lambda g_: be.row_lse_xy(X, Y, s, g_),
                              lambda f_: be.col_lse_xy(X, Y, s, f_), r, c, n_iters, f, g)
        coef_row, coef_col = _coefficients(y, z, weights, acc)
        # target logits s * <x_i, y_{y_i}> and s * <x_{z_j}, y_j>: O((N + M) D)
        t_row = (X.to(acc) * Y[y.clamp(min=0)].to(acc)).sum(1) * s
        t_col = (X[z.clamp(min=0)].to(acc) * Y.to(acc)).sum(1) * s
        loss = _assemble(fw, t_row, t_col, y, z, coef_row, coef_col)
        ctx.save_for_backward(X, Y, fw.f, fw.g, fw.lse_row, fw.lse_col, coef_row, coef_col,
                              y, z)
        ctx.s, ctx.be = s, be
        ctx.scale_meta = None if scale_t is None else (scale_t.device, scale_t.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        X, Y, f, g, lse_row, lse_col, coef_row, coef_col, y, z = ctx.saved_tensors
        dX, dY, ds = ctx.be.ncl_grad_xy(X, Y, ctx.s, f, g, lse_row, lse_col,
                                        coef_row * grad_loss, coef_col * grad_loss, y, z,
                                        need_dx=ctx.needs_input_grad[0],
                                        need_dy=ctx.needs_input_grad[1])
        return (dX, dY, _scale_grad(ctx, 2, ds)) + (None,) * 10


def _loss_options(like: Tensor, n: int, m: int, scale, row_targets, col_targets, n_iters,
                  f, g, weights, row_mass, col_mass):
    s = V.scale(scale)
    scale_t = scale if isinstance(scale, Tensor) else None
    V.iterations(n_iters, None, 1)
    y, z = V.targets(row_targets, col_targets, n, m, like)
    if (f is None) != (g is None):
        raise ValueError("pass both f and g (precomputed biases) or neither (solve them)")
    f = V.potential("f", f, n, like)
    g = V.potential("g", g, m, like)
    w = V.weights(weights)
    r, c = V.masses(row_mass, col_mass, n, m, like)
    return s, scale_t, y, z, f, g, w, r, c


def ncl_loss(scores: Tensor, scale=1.0, *, row_targets=None, col_targets=None,
             n_iters: int = 4, f=None, g=None, weights=(0.5, 0.5), row_mass=None,
             col_mass=None, inplace_backward: bool = False, backend: str = "auto") -> Tensor:
    """NCL loss on the logits ``scale * scores`` (SPEC.md section 3), differentiable.

    Args:
        scores: (N, M) similarity matrix (float32/float64/bfloat16/float16, unit column
            stride). Gradients flow to it and to ``scale`` when that is a tensor requiring
            grad.
        row_targets, col_targets: int64 (N,) in ``[0, M)`` and (M,) in ``[0, N)``; ``-1``
            means no loss term for that row/column. Default: the diagonal of the leading
            square block, so extra rows/columns (a queue) are negatives only.
        n_iters: Sinkhorn iterations for the biases (``tol=None``: no host sync per
            iteration); 0 gives CLIP's symmetric InfoNCE.
        f, g: precomputed biases (both or neither); they are constants for the gradient.
        weights: ``(w_row, w_col)``; the mean over an empty target set counts as 0.
        row_mass, col_mass: masses for the bias solve (defaults as in :func:`sinkhorn`).
        inplace_backward: the backward writes ``dloss/dscores`` over the storage of
            ``scores`` (after using it for ``dloss/dscale``) and hands that storage to
            autograd as the gradient: no N x M buffer is allocated, and the caller gives up
            ``scores``. Default False: a new buffer; ``scores`` is never written.
        backend: see :func:`ncl_kernels.backends`.

    Returns:
        0-dim float32 tensor (float64 for float64 scores).
    """
    S = V.scores(scores)
    inplace = V.flag("inplace_backward", inplace_backward)
    N, M = S.shape
    s, scale_t, y, z, f, g, w, r, c = _loss_options(S, N, M, scale, row_targets, col_targets,
                                                    n_iters, f, g, weights, row_mass,
                                                    col_mass)
    be = get_backend(backend, S.device)
    return _DenseLoss.apply(S, scale_t, s, be, r, c, y, z, n_iters, f, g, w, inplace)


def ncl_loss_embeddings(x: Tensor, y: Tensor, scale=1.0, *, row_targets=None,
                        col_targets=None, n_iters: int = 4, f=None, g=None,
                        weights=(0.5, 0.5), row_mass=None, col_mass=None,
                        backend: str = "auto") -> Tensor:
    """:func:`ncl_loss` on ``scores = x @ y.T`` without materializing it.

    Forward and backward stream over chunks of rows (the backward recomputes each chunk of
    ``x @ y.T``), so memory stays O((N + M) * D + chunk * M). Gradients flow to ``x``,
    ``y`` and a tensor ``scale``. Options as in :func:`ncl_loss` (there is no
    ``inplace_backward``: no N x M buffer exists to reuse).
    """
    X, Y = V.embeddings(x, y)
    N, M = X.shape[0], Y.shape[0]
    s, scale_t, yt, zt, f, g, w, r, c = _loss_options(X, N, M, scale, row_targets,
                                                      col_targets, n_iters, f, g, weights,
                                                      row_mass, col_mass)
    be = get_backend(backend, X.device)
    return _EmbeddingLoss.apply(X, Y, scale_t, s, be, r, c, yt, zt, n_iters, f, g, w)


def apply_biases_(scores: Tensor, scale=1.0, f=None, g=None, *, backend: str = "auto") -> Tensor:
    """In place ``scores <- scale * scores + f[:, None] + g[None, :]``; returns ``scores``.

    The arithmetic runs in float32 (float64 for float64) and is rounded once to the storage
    dtype. Not differentiable: a tensor that requires grad is refused, and on any error the
    caller's tensor is left untouched.
    """
    S = V.scores(scores)
    if S.requires_grad:
        raise ValueError("apply_biases_ is an in-place, non-differentiable update; pass a "
                         "tensor that does not require grad (e.g. scores.detach())")
    N, M = S.shape
    s = V.scale(scale)
    f = V.potential("f", f, N, S)
    g = V.potential("g", g, M, S)
    be = get_backend(backend, S.device)
    with torch.no_grad():
        return be.apply_biases_(S, s, f, g)
