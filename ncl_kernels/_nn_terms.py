"""The optional terms of :class:`ncl_kernels.NCLLoss` beyond the loss op (docs/training.md).

Each is computed above the kernels with torch ops and the backends' LSE primitives; each
takes the biases ``f, g`` that the loss used (solved on the whole problem, queue included):

- :func:`all_positives`: every caption of a video is its positive in the video-to-text
  term (the loss op takes one target per column, the video's first caption).
- :func:`own_bias_term`: a zero-valued term whose gradient is the loss's dependence
  through each row's and column's own bias, which the stop-gradient biases leave out.
- :func:`offset_spread`: the spread of the per-item mean logits, a restoring force on the
  offsets that the biases absorb.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from . import _library, _loss_math as LM

Tensor = torch.Tensor
POSITIVES = ("first", "all", "mean")


def detached(scale):
    """``scale`` without its graph (the biases are constants for the gradient)."""
    return scale.detach() if isinstance(scale, Tensor) else scale


def positive_logits(x: Tensor, y: Tensor, scale, c2v: Tensor, f: Tensor) -> Tensor:
    """``a_i = scale * <x_i, y_{c2v_i}> + f_i`` for every caption of the batch: O(N D);
    ``-inf`` for a caption marked ``-1`` (no video: it takes no part)."""
    a = scale * (x * y[c2v.clamp(min=0)]).sum(1).to(f.dtype) + f
    return torch.where(c2v >= 0, a, float("-inf"))


def _group_lse(a: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """``LSE`` of ``a`` within each group (``-inf`` for an empty group)."""
    top = torch.full((n_groups,), float("-inf"), dtype=a.dtype, device=a.device)
    top = top.scatter_reduce(0, group, a.detach(), "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(n_groups, dtype=a.dtype, device=a.device)
    total = total.index_add(0, group, (a - safe[group]).exp())
    return total.log() + safe


def target_weights(a: Tensor, c2v: Tensor, counts: Tensor, positives: str) -> Tensor:
    """Each caption's weight as a target of its video's term (detached): ``"all"``: the
    softmax of ``a`` over the video's captions; ``"mean"``: ``1 / count``."""
    with torch.no_grad():
        video = c2v.clamp(min=0)
        if positives == "mean":
            return torch.where(c2v >= 0, 1.0 / counts.to(a.dtype)[video].clamp(min=1), 0.0)
        return (a - _group_lse(a, video, counts.shape[0])[video]).exp()


def all_positives(x: Tensor, y: Tensor, scale, c2v: Tensor, z: Tensor, counts: Tensor,
                  f: Tensor, w_col: float, positives: str) -> Tensor:
    """What to add to a loss whose video-to-text term targets each video's first caption
    ``z_j`` so that it targets all of the video's captions ``P_j`` instead:

        w_col / |C| * sum_{j in C} (a_{z_j} - agg_{i in P_j} a_i),   a_i = L_{i,c2v_i} + f_i

    with ``agg`` the log-sum-exp (``"all"``) or the mean (``"mean"``). The LSE part of the
    term is the loss op's; only the target part changes, and it reads the N positive
    logits: O(N D) (docs/training.md, several captions per video).
    """
    V = y.shape[0]
    a = positive_logits(x, y, scale, c2v, f)
    video = c2v.clamp(min=0)
    has = z >= 0
    first = a[z.clamp(min=0)]
    if positives == "mean":   # captions marked -1 add nothing and are not counted
        agg = torch.zeros(V, dtype=a.dtype, device=a.device).index_add(
            0, video, torch.where(c2v >= 0, a, 0.0))
        agg = agg / counts.to(a.dtype).clamp(min=1)
    else:
        agg = _group_lse(a, video, V)
    diff = torch.where(has, first - torch.where(has, agg, torch.zeros_like(agg)),
                       torch.zeros_like(agg))
    return diff.sum() * (w_col / has.sum().clamp(min=1).to(diff.dtype))


def _softmax_mass_kernel(backend: str):
    def kernel(X, Y, scale_t, scale_f, own, log_w):
        s = float(scale_t) if scale_t is not None else scale_f
        lse = _library.op("col_lse_xy", backend)(X, Y, s, own)
        return (own + _library.op("row_lse_xy", backend)(X, Y, s, log_w - lse)).exp()
    return kernel


# an op, so that a compiled step reads the scale's value inside it, not in traced Python
_library.define("softmax_mass_xy",
                "(Tensor X, Tensor Y, Tensor? scale_t, float scale_f, Tensor own, "
                "Tensor log_w) -> Tensor", _softmax_mass_kernel,
                lambda X, Y, scale_t, scale_f, own, log_w: own.new_empty(X.shape[0]))


def _softmax_mass(backend: str, X: Tensor, Y: Tensor, scale, own: Tensor, weights: Tensor,
                  dense: bool) -> Tensor:
    """``sum_j weights_j softmax_i(L_.j + own)_i`` for every row ``i`` of ``L = scale X Y^T``
    (detached): the mass each row receives from the columns' softmaxes over the rows. Dense:
    one softmax; streaming: two LSE passes of the backend (the op ``softmax_mass_xy``),
    never N x M in memory."""
    if dense:
        L = scale * (X @ Y.T).to(own.dtype) + own[:, None]
        return torch.softmax(L, 0) @ weights
    log_w = torch.where(weights > 0, weights.log(), torch.full_like(weights, float("-inf")))
    tensor = isinstance(scale, Tensor)
    return _library.op("softmax_mass_xy", backend)(
        X, Y, scale.to(own.dtype) if tensor else None, 0.0 if tensor else float(scale),
        own, log_w)


def _weighted_lse(X: Tensor, Y: Tensor, scale, bias: Tensor, weights: Tensor,
                  dense: bool, rows_per_chunk: int) -> Tensor:
    """``sum_i weights_i LSE_j(scale * <X_i, Y_j> + bias_j)``, differentiable in X, Y and
    scale; by chunks of rows recomputed in the backward when not ``dense``, so memory stays
    O(chunk x M)."""
    def part(Xc, wc):
        L = scale * (Xc @ Y.T).to(bias.dtype) + bias
        return (wc * torch.logsumexp(L, 1)).sum()

    if dense:
        return part(X, weights)
    total = X.new_zeros((), dtype=bias.dtype)
    for start in range(0, X.shape[0], rows_per_chunk):
        stop = min(X.shape[0], start + rows_per_chunk)
        total = total + checkpoint(part, X[start:stop], weights[start:stop],
                                   use_reentrant=False)
    return total


def own_bias_term(X: Tensor, Y: Tensor, scale, f: Tensor, g: Tensor, n_rows: int,
                  n_cols: int, row_targets: Tensor, col_targets: Tensor, w_row: float,
                  w_col: float, *, col_target_weights: Optional[Tensor] = None,
                  dense: bool, rows_per_chunk: int, backend: str) -> Tensor:
    """Zero-valued; its gradient is the loss's dependence through each bias on its own row
    or column (docs/training.md, the drift).

    ``X`` (NT rows) and ``Y`` (MT columns) are the whole problem the biases were solved on,
    the loss's block its first ``n_rows`` x ``n_cols``. With ``f_i = -LSE_j(L_ij + g_j)``
    over all columns and ``g_j = log c_j - LSE_i(L_ij + f_i)`` over all rows, each with the
    other side fixed, the term is ``sum_i (dloss/df_i) f_i + sum_j (dloss/dg_j) g_j`` with
    the coefficients detached: ``dloss/df_i = w_col/|C| sum_{j in C} (P^col_ij - t_ij)``
    (``P^col``: the column softmax of the block, ``t``: the target weights) and
    ``dloss/dg_j = w_row/|R| sum_{i in R} (P^row_ij - [y_i = j])``. For biases solved to
    convergence on the block itself (no queue) both coefficients vanish.
    """
    s = detached(scale)
    acc = f.dtype
    with torch.no_grad():
        Xb, Yb = X[:n_rows].detach(), Y[:n_cols].detach()
        y, z = row_targets[:n_rows], col_targets[:n_cols]
        has_y, has_z = y >= 0, z >= 0
        wr, wc = LM.coefficients(y, z, w_row, w_col, acc)   # the loss's own weights
        # dloss/df_i: the mass of row i in the columns' softmaxes, less its target weight
        a = _softmax_mass(backend, Xb, Yb, s, f[:n_rows], wc, dense)
        if col_target_weights is None:   # one target per column: row z_j
            a = a.index_add(0, z[has_z], -wc[has_z])
        else:                            # row i is a target of column y_i
            a = a - torch.where(has_y, col_target_weights * wc[y.clamp(min=0)],
                                torch.zeros_like(a))
        # dloss/dg_j: the same, columns and rows swapped
        b = _softmax_mass(backend, Yb, Xb, s, g[:n_cols], wr, dense)
        b = b.index_add(0, y[has_y], -wr[has_y])
    # -LSE_j(L_ij + g_j) over all columns, and -LSE_i(L_ij + f_i) over all rows
    term = -(_weighted_lse(X[:n_rows], Y, scale, g, a, dense, rows_per_chunk)
             + _weighted_lse(Y[:n_cols], X, scale, f, b, dense, rows_per_chunk))
    return term - term.detach()


def offset_spread(x: Tensor, y: Tensor, scale, row_mass: Optional[Tensor] = None) -> Tensor:
    """``Var_i(scale <x_i, mean(y)>) + Var_j(scale <y_j, mean(x)>)`` over the batch: the
    spread of each caption's mean logit and each video's, O((N + V) D). With
    ``row_mass``, captions without mass (marked ``-1``) are left out of both."""
    if row_mass is None:
        rows = scale * (x @ y.mean(0))
        cols = scale * (y @ x.mean(0))
        return rows.var(unbiased=False) + cols.var(unbiased=False)
    w = (row_mass > 0).to(x.dtype)
    w = w / w.sum().clamp(min=1)
    rows = scale * (x @ y.mean(0))
    cols = scale * (y @ (w @ x))
    mean_row = (w * rows).sum()
    return (w * (rows - mean_row) ** 2).sum() + cols.var(unbiased=False)
