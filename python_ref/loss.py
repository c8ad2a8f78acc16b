"""Float64 oracle for the NCL loss and its explicit gradient (docs/math.md section 3)."""

import torch

from ._common import check_matrix, check_vector, masked_logits, scale_tensor, scale_value
from .sinkhorn import sinkhorn

__all__ = ["default_targets", "ncl_loss", "ncl_loss_embeddings", "ncl_grad", "apply_biases"]


def default_targets(n, m, *, device=None):
    """Default targets (docs/math.md section 3): ``y_i = i`` and ``z_j = j`` below ``min(n, m)``, ``-1`` beyond."""
    k = min(n, m)
    y = torch.arange(n, dtype=torch.int64, device=device)
    z = torch.arange(m, dtype=torch.int64, device=device)
    y[k:] = -1
    z[k:] = -1
    return y, z


def _targets(t, length, bound, name, device):
    """Targets as int64 of shape (length,), each in ``[0, bound)`` or ``-1`` (else ValueError)."""
    t = torch.as_tensor(t, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    t = t.to(torch.int64)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if ((t < -1) | (t >= bound)).any():
        raise ValueError(f"{name} entries must be in [0, {bound}) or -1")
    return t


def _resolve(scores, row_targets, col_targets, weights):
    n, m = scores.shape
    device = scores.device
    if row_targets is None or col_targets is None:
        y0, z0 = default_targets(n, m, device=device)
    y = y0 if row_targets is None else _targets(row_targets, n, m, "row_targets", device)
    z = z0 if col_targets is None else _targets(col_targets, m, n, "col_targets", device)
    if len(weights) != 2:
        raise ValueError(f"weights must be (w_row, w_col), got {weights!r}")
    w_row, w_col = float(weights[0]), float(weights[1])
    return y, z, w_row, w_col


def ncl_loss(
    scores,
    scale=1.0,
    *,
    row_targets=None,
    col_targets=None,
    n_iters=4,
    f=None,
    g=None,
    weights=(0.5, 0.5),
    row_mass=None,
    col_mass=None,
    dtype=torch.float64,
):
    """The NCL loss (docs/math.md section 3) as a 0-dim tensor, differentiable w.r.t. ``scores`` and a tensor ``scale``.

    ``f, g`` are constants (detached): given by the caller (both or neither, else
    ``ValueError``) or from ``sinkhorn(scores, scale, n_iters=n_iters, tol=None, masses)``;
    ``row_mass``/``col_mass`` only matter in that second case.

    ``loss = w_row * mean_{i in R}(LSE_row_i(g) - L[i, y_i] - g[y_i])
           + w_col * mean_{j in C}(LSE_col_j(f) - L[z_j, j] - f[z_j])``.

    Decisions where the SPEC is silent: an empty ``R`` (or ``C``) contributes 0 (the loss
    stays connected to the graph, with zero gradient); targets outside ``[0, bound)`` and
    ``!= -1`` raise ``ValueError``; ``-inf`` scores are masks whose gradient (to ``S`` and to
    ``scale``) is exactly 0; a target on a masked entry or on a zero-mass row/column gives
    ``+inf``.
    """
    check_matrix(scores, "scores")
    n, m = scores.shape
    device = scores.device
    if (f is None) != (g is None):
        raise ValueError("pass both f and g, or neither (then they come from sinkhorn)")
    if f is None:
        res = sinkhorn(
            scores.detach(),
            scale_value(scale),
            row_mass=row_mass,
            col_mass=col_mass,
            n_iters=n_iters,
            tol=None,
            dtype=dtype,
        )
        f, g = res.f, res.g
    else:
        f = check_vector(f, n, "f", dtype, device)
        g = check_vector(g, m, "g", dtype, device)
    y, z, w_row, w_col = _resolve(scores, row_targets, col_targets, weights)

    S = scores.to(dtype)
    L = masked_logits(S, scale_tensor(scale, dtype, device))
    lse_row = torch.logsumexp(L + g[None, :], dim=1)  # (N,)
    lse_col = torch.logsumexp(L + f[:, None], dim=0)  # (M,)

    rows = (y >= 0).nonzero().flatten()
    cols = (z >= 0).nonzero().flatten()
    term_row = lse_row[rows] - L[rows, y[rows]] - g[y[rows]]
    term_col = lse_col[cols] - L[z[cols], cols] - f[z[cols]]
    # Sum of an empty selection is 0 and still part of the graph.
    loss_row = term_row.sum() / max(rows.numel(), 1)
    loss_col = term_col.sum() / max(cols.numel(), 1)
    return w_row * loss_row + w_col * loss_col


def ncl_loss_embeddings(
    x,
    y,
    scale=1.0,
    *,
    row_targets=None,
    col_targets=None,
    n_iters=4,
    f=None,
    g=None,
    weights=(0.5, 0.5),
    row_mass=None,
    col_mass=None,
    dtype=torch.float64,
):
    """:func:`ncl_loss` on ``S = x @ y.T`` formed in ``dtype``; autograd flows to ``x`` and ``y``."""
    S = x.to(dtype) @ y.to(dtype).T
    return ncl_loss(
        S,
        scale,
        row_targets=row_targets,
        col_targets=col_targets,
        n_iters=n_iters,
        f=f,
        g=g,
        weights=weights,
        row_mass=row_mass,
        col_mass=col_mass,
        dtype=dtype,
    )


def ncl_grad(
    scores,
    scale,
    f,
    g,
    row_targets=None,
    col_targets=None,
    weights=(0.5, 0.5),
    *,
    dtype=torch.float64,
):
    """``G = dloss/dL`` (N x M) by the explicit formula of docs/math.md section 3:

    ``G_ij = w_row/|R| [i in R] (exp(L_ij + g_j - LSE_row_i(g)) - [j = y_i])
           + w_col/|C| [j in C] (exp(L_ij + f_i - LSE_col_j(f)) - [i = z_j])``

    with both LSEs from the same ``f, g``. Then ``dloss/dS = scale * G`` and
    ``dloss/dscale = sum_ij G_ij S_ij`` (masked ``-inf`` entries have ``G_ij = 0`` and, by
    convention, contribute 0 to that sum). Empty ``R`` or ``C``: that term is 0.
    """
    check_matrix(scores, "scores")
    n, m = scores.shape
    device = scores.device
    f = check_vector(f, n, "f", dtype, device)
    g = check_vector(g, m, "g", dtype, device)
    y, z, w_row, w_col = _resolve(scores, row_targets, col_targets, weights)
    S = scores.detach().to(dtype)
    L = masked_logits(S, torch.tensor(scale_value(scale), dtype=dtype, device=device))
    lse_row = torch.logsumexp(L + g[None, :], dim=1)
    lse_col = torch.logsumexp(L + f[:, None], dim=0)

    G = torch.zeros(n, m, dtype=dtype, device=device)
    rows = (y >= 0).nonzero().flatten()
    cols = (z >= 0).nonzero().flatten()
    if rows.numel():
        P_row = torch.exp(L[rows] + g[None, :] - lse_row[rows, None])  # softmax over j
        P_row[torch.arange(rows.numel(), device=device), y[rows]] -= 1.0
        G[rows] += (w_row / rows.numel()) * P_row
    if cols.numel():
        P_col = torch.exp(L[:, cols] + f[:, None] - lse_col[None, cols])  # softmax over i
        P_col[z[cols], torch.arange(cols.numel(), device=device)] -= 1.0
        G[:, cols] += (w_col / cols.numel()) * P_col
    return G


def apply_biases(scores, scale=1.0, f=None, g=None, *, dtype=torch.float64):
    """New tensor ``scale * S + f[:, None] + g[None, :]`` (``None`` = zero); the out-of-place
    oracle of the ``apply_biases_`` primitive (docs/extending.md)."""
    S = scores.to(dtype)
    out = masked_logits(S, scale_tensor(scale, dtype, S.device))
    if f is not None:
        out = out + f.to(dtype)[:, None]
    if g is not None:
        out = out + g.to(dtype)[None, :]
    return out
