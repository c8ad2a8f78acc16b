"""The NCL loss as ``torch.library`` custom ops: the boundary ``torch.compile`` sees.

Four ops, each dispatching through the backend seam (``backends.get(name, device)``), so
every backend gets ``torch.compile`` support without knowing about it:

    ncl_kernels::loss            dense forward      -> (loss, f, g, lse_row, lse_col)
    ncl_kernels::loss_backward   dense backward     -> (dscores or empty, dscale_sum)
    ncl_kernels::loss_backward_  dense backward that writes dscores over ``scores``
    ncl_kernels::loss_xy         streaming forward  -> (loss, f, g, lse_row, lse_col)
    ncl_kernels::loss_xy_backward  streaming backward -> (dx, dy, dscale_sum)

The public functions in ``loss.py`` run the metadata checks of ``_validate`` in (traced)
Python; the checks that read data (NaN/+inf scans, target ranges, masses, the scale's
value, feasibility in the first Sinkhorn passes) run here, inside the op implementations,
so they never break a graph. The fake implementations only allocate outputs.

Optional inputs travel as ``None`` and are resolved to their defaults inside the ops, for
the same reason (the default column mass needs ``sum(r)``). The forward returns the
biases and LSE vectors, which the backward needs; they are constants for the gradient
(stop-gradient, as in the method), so the registered backward ignores their gradients.
``scale`` travels as ``(scale_t, scale_f)``: a 0-dim tensor (read inside the op; it gets a
gradient) or, when ``scale_t`` is None, a Python number.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import _validate as V
from .backends import get as get_backend
from .backends.base import acc_dtype
from .sinkhorn import solve

Tensor = torch.Tensor


# -- the math shared by the dense and streaming forms ------------------------------------

class _Forward(NamedTuple):
    f: Tensor
    g: Tensor
    lse_row: Tensor
    lse_col: Tensor


class _Problem(NamedTuple):
    s: float
    y: Tensor
    z: Tensor
    r: Tensor
    c: Tensor
    f: Optional[Tensor]
    g: Optional[Tensor]


def _resolve(like: Tensor, n: int, m: int, scale_t, scale_f, row_targets, col_targets,
             row_mass, col_mass, f, g) -> _Problem:
    """The data half of the loss's validation, and the defaults (SPEC.md sections 1, 3)."""
    acc = acc_dtype(like.dtype)
    s = V.scale_value(scale_t, scale_f)
    y, z = V.targets_values(row_targets, col_targets, n, m, like.device)
    f = V.potential_values("f", f, acc)
    g = V.potential_values("g", g, acc)
    r, c = V.masses_values(row_mass, col_mass, n, m, like)
    return _Problem(s, y, z, r, c, f, g)


def _biases_and_lses(row_lse, col_lse, r, c, n_iters, f, g) -> _Forward:
    """``f, g`` (solved unless given) with ``LSE_row(g)`` and ``LSE_col(f)``.

    After a solve, the last column pass already holds ``LSE_col(f)`` and the closing row
    pass ``LSE_row(g)``, so the forward costs no pass beyond the Sinkhorn iterations.
    """
    if f is None:
        sol = solve(row_lse, col_lse, r, c, n_iters=n_iters, tol=None, check_every=1)
        f, g, lse_row, lse_col = sol.f, sol.g, sol.lse_row, sol.lse_col
    else:
        # given biases may be the caller's tensors: outputs of an op must not alias inputs
        f, g = f.clone(), g.clone()
        lse_row, lse_col = row_lse(g), None
    if lse_col is None:
        lse_col = col_lse(f)
    return _Forward(f, g, lse_row, lse_col)


def _coefficients(y: Tensor, z: Tensor, w_row: float, w_col: float,
                  acc) -> Tuple[Tensor, Tensor]:
    """Per-row ``w_row / |R|`` and per-column ``w_col / |C|`` (0 without a target).

    An empty R (or C) contributes 0 to the loss: the mean over no terms is taken as 0.
    """
    has_y, has_z = (y >= 0).to(acc), (z >= 0).to(acc)
    coef_row = has_y * (w_row / has_y.sum().clamp(min=1))
    coef_col = has_z * (w_col / has_z.sum().clamp(min=1))
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


def _fake_forward(like: Tensor, n: int, m: int):
    acc = acc_dtype(like.dtype)
    return (like.new_empty((), dtype=acc), like.new_empty(n, dtype=acc),
            like.new_empty(m, dtype=acc), like.new_empty(n, dtype=acc),
            like.new_empty(m, dtype=acc))


# -- dense form ---------------------------------------------------------------------------

@torch.library.custom_op("ncl_kernels::loss", mutates_args=())
def loss_dense(S: Tensor, scale_t: Optional[Tensor], scale_f: float, backend: str,
               row_targets: Optional[Tensor], col_targets: Optional[Tensor],
               row_mass: Optional[Tensor], col_mass: Optional[Tensor], f: Optional[Tensor],
               g: Optional[Tensor], n_iters: int, w_row: float, w_col: float,
               inplace_backward: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dense NCL forward; ``inplace_backward`` is only read by the registered backward."""
    be = get_backend(backend, S.device)
    V.scores_values(S)
    N, M = S.shape
    p = _resolve(S, N, M, scale_t, scale_f, row_targets, col_targets, row_mass, col_mass,
                 f, g)
    acc = acc_dtype(S.dtype)
    rows = torch.arange(N, device=S.device)
    cols = torch.arange(M, device=S.device)
    t_row = S[rows, p.y.clamp(min=0)].to(acc) * p.s
    t_col = S[p.z.clamp(min=0), cols].to(acc) * p.s
    V.targets_unmasked(t_row, t_col, p.y, p.z)
    fw = _biases_and_lses(lambda g_: be.row_lse(S, p.s, g_),
                          lambda f_: be.col_lse(S, p.s, f_), p.r, p.c, n_iters, p.f, p.g)
    coef_row, coef_col = _coefficients(p.y, p.z, w_row, w_col, acc)
    loss = _assemble(fw, t_row, t_col, p.y, p.z, coef_row, coef_col)
    return (loss,) + tuple(fw)


@loss_dense.register_fake
def _(S, scale_t, scale_f, backend, row_targets, col_targets, row_mass, col_mass, f, g,
      n_iters, w_row, w_col, inplace_backward):
    return _fake_forward(S, S.shape[0], S.shape[1])


def _dense_grad(grad, S, scale_t, scale_f, backend, row_targets, col_targets, f, g,
                lse_row, lse_col, w_row, w_col, out):
    be = get_backend(backend, S.device)
    s = V.scale_value(scale_t, scale_f)
    y, z = V.targets_values(row_targets, col_targets, S.shape[0], S.shape[1], S.device)
    coef_row, coef_col = _coefficients(y, z, w_row, w_col, acc_dtype(S.dtype))
    grad = grad.to(coef_row.dtype)
    return be.ncl_grad_(S, s, f, g, lse_row, lse_col, coef_row * grad, coef_col * grad,
                        y, z, out=out)


@torch.library.custom_op("ncl_kernels::loss_backward", mutates_args=())
def loss_dense_backward(grad: Tensor, S: Tensor, scale_t: Optional[Tensor], scale_f: float,
                        backend: str, row_targets: Optional[Tensor],
                        col_targets: Optional[Tensor], f: Tensor, g: Tensor,
                        lse_row: Tensor, lse_col: Tensor, w_row: float, w_col: float,
                        need_scores: bool) -> Tuple[Tensor, Tensor]:
    """``(dloss/dS or an empty tensor, sum_ij G_ij S_ij)`` times the upstream ``grad``."""
    out = torch.empty(S.shape, dtype=S.dtype, device=S.device) if need_scores else None
    ds = _dense_grad(grad, S, scale_t, scale_f, backend, row_targets, col_targets, f, g,
                     lse_row, lse_col, w_row, w_col, out)
    return (S.new_empty(0) if out is None else out), ds


@loss_dense_backward.register_fake
def _(grad, S, scale_t, scale_f, backend, row_targets, col_targets, f, g, lse_row, lse_col,
      w_row, w_col, need_scores):
    dS = torch.empty_like(S, memory_format=torch.contiguous_format) if need_scores \
        else S.new_empty(0)
    return dS, S.new_empty((), dtype=acc_dtype(S.dtype))


@torch.library.custom_op("ncl_kernels::loss_backward_", mutates_args=("S",))
def loss_dense_backward_(grad: Tensor, S: Tensor, scale_t: Optional[Tensor], scale_f: float,
                         backend: str, row_targets: Optional[Tensor],
                         col_targets: Optional[Tensor], f: Tensor, g: Tensor,
                         lse_row: Tensor, lse_col: Tensor, w_row: float,
                         w_col: float) -> Tensor:
    """As ``loss_backward``, but writes ``dloss/dS`` over ``S`` (each element is read
    before it is written); returns ``sum_ij G_ij S_ij`` of the original ``S``."""
    return _dense_grad(grad, S, scale_t, scale_f, backend, row_targets, col_targets, f, g,
                       lse_row, lse_col, w_row, w_col, S)


@loss_dense_backward_.register_fake
def _(grad, S, scale_t, scale_f, backend, row_targets, col_targets, f, g, lse_row, lse_col,
      w_row, w_col):
    return S.new_empty((), dtype=acc_dtype(S.dtype))


def _dscale(ctx, index: int, ds: Tensor, scale_t: Optional[Tensor]) -> Optional[Tensor]:
    return ds.to(scale_t.dtype) if ctx.needs_input_grad[index] else None


def _dense_setup(ctx, inputs, output):
    (S, scale_t, scale_f, backend, row_targets, col_targets, _r, _c, _f, _g, _n, w_row,
     w_col, inplace) = inputs
    _loss, f, g, lse_row, lse_col = output
    ctx.mark_non_differentiable(f, g, lse_row, lse_col)   # stop-gradient biases
    ctx.save_for_backward(S, scale_t, row_targets, col_targets, f, g, lse_row, lse_col)
    ctx.options = (scale_f, backend, w_row, w_col, inplace)


def _dense_backward(ctx, grad, *_unused):
    S, scale_t, row_targets, col_targets, f, g, lse_row, lse_col = ctx.saved_tensors
    scale_f, backend, w_row, w_col, inplace = ctx.options
    args = (scale_t, scale_f, backend, row_targets, col_targets, f, g, lse_row, lse_col,
            w_row, w_col)
    need_S = ctx.needs_input_grad[0]
    if need_S and inplace:
        # the caller gave up S (documented): its storage becomes the gradient
        ds = torch.ops.ncl_kernels.loss_backward_(grad, S, *args)
        # a fresh alias of S, not S itself (which autograd and the caller still hold): only
        # a gradient nobody else references is stored as .grad without a copy
        dS = S.detach()
    else:
        dS, ds = torch.ops.ncl_kernels.loss_backward(grad, S, *args, need_S)
        dS = dS if need_S else None
    return (dS, _dscale(ctx, 1, ds, scale_t)) + (None,) * 12


loss_dense.register_autograd(_dense_backward, setup_context=_dense_setup)


# -- streaming form -----------------------------------------------------------------------

@torch.library.custom_op("ncl_kernels::loss_xy", mutates_args=())
def loss_xy(X: Tensor, Y: Tensor, scale_t: Optional[Tensor], scale_f: float, backend: str,
            row_targets: Optional[Tensor], col_targets: Optional[Tensor],
            row_mass: Optional[Tensor], col_mass: Optional[Tensor], f: Optional[Tensor],
            g: Optional[Tensor], n_iters: int, w_row: float,
            w_col: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Streaming NCL forward on ``scores = X @ Y.T`` (never materialized)."""
    be = get_backend(backend, X.device)
    V.embeddings_values(X, Y)
    N, M = X.shape[0], Y.shape[0]
    p = _resolve(X, N, M, scale_t, scale_f, row_targets, col_targets, row_mass, col_mass,
                 f, g)
    acc = acc_dtype(X.dtype)
    fw = _biases_and_lses(lambda g_: be.row_lse_xy(X, Y, p.s, g_),
                          lambda f_: be.col_lse_xy(X, Y, p.s, f_), p.r, p.c, n_iters,
                          p.f, p.g)
    coef_row, coef_col = _coefficients(p.y, p.z, w_row, w_col, acc)
    # target logits s * <x_i, y_{y_i}> and s * <x_{z_j}, y_j>, O((N + M) D), rounded as
    # the LSE passes round them
    t_row, t_col = be.target_logits_xy(X, Y, p.s, p.y, p.z)
    loss = _assemble(fw, t_row, t_col, p.y, p.z, coef_row, coef_col)
    return (loss,) + tuple(fw)


@loss_xy.register_fake
def _(X, Y, scale_t, scale_f, backend, row_targets, col_targets, row_mass, col_mass, f, g,
      n_iters, w_row, w_col):
    return _fake_forward(X, X.shape[0], Y.shape[0])


@torch.library.custom_op("ncl_kernels::loss_xy_backward", mutates_args=())
def loss_xy_backward(grad: Tensor, X: Tensor, Y: Tensor, scale_t: Optional[Tensor],
                     scale_f: float, backend: str, row_targets: Optional[Tensor],
                     col_targets: Optional[Tensor], f: Tensor, g: Tensor, lse_row: Tensor,
                     lse_col: Tensor, w_row: float, w_col: float, need_x: bool,
                     need_y: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dX or empty, dY or empty, sum_ij G_ij S_ij)`` times the upstream ``grad``."""
    be = get_backend(backend, X.device)
    s = V.scale_value(scale_t, scale_f)
    y, z = V.targets_values(row_targets, col_targets, X.shape[0], Y.shape[0], X.device)
    coef_row, coef_col = _coefficients(y, z, w_row, w_col, acc_dtype(X.dtype))
    grad = grad.to(coef_row.dtype)
    dX, dY, ds = be.ncl_grad_xy(X, Y, s, f, g, lse_row, lse_col, coef_row * grad,
                                coef_col * grad, y, z, need_dx=need_x, need_dy=need_y)
    return (X.new_empty(0) if dX is None else dX), (Y.new_empty(0) if dY is None else dY), ds


@loss_xy_backward.register_fake
def _(grad, X, Y, scale_t, scale_f, backend, row_targets, col_targets, f, g, lse_row,
      lse_col, w_row, w_col, need_x, need_y):
    dX = torch.empty_like(X, memory_format=torch.contiguous_format) if need_x \
        else X.new_empty(0)
    dY = torch.empty_like(Y, memory_format=torch.contiguous_format) if need_y \
        else Y.new_empty(0)
    return dX, dY, X.new_empty((), dtype=acc_dtype(X.dtype))


def _xy_setup(ctx, inputs, output):
    (X, Y, scale_t, scale_f, backend, row_targets, col_targets, _r, _c, _f, _g, _n, w_row,
     w_col) = inputs
    _loss, f, g, lse_row, lse_col = output
    ctx.mark_non_differentiable(f, g, lse_row, lse_col)   # stop-gradient biases
    ctx.save_for_backward(X, Y, scale_t, row_targets, col_targets, f, g, lse_row, lse_col)
    ctx.options = (scale_f, backend, w_row, w_col)


def _xy_backward(ctx, grad, *_unused):
    X, Y, scale_t, row_targets, col_targets, f, g, lse_row, lse_col = ctx.saved_tensors
    scale_f, backend, w_row, w_col = ctx.options
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dX, dY, ds = torch.ops.ncl_kernels.loss_xy_backward(
        grad, X, Y, scale_t, scale_f, backend, row_targets, col_targets, f, g, lse_row,
        lse_col, w_row, w_col, need_x, need_y)
    return ((dX if need_x else None, dY if need_y else None,
             _dscale(ctx, 2, ds, scale_t)) + (None,) * 11)


loss_xy.register_autograd(_xy_backward, setup_context=_xy_setup)
