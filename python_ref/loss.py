"""Float64 oracle for the NCL loss and its explicit gradient (docs/math.md section 3)."""

import torch

from ._common import check_matrix, check_vector, masked_logits, scale_tensor, scale_value
from .sinkhorn import masses, sinkhorn

__all__ = ["default_targets", "ncl_loss", "ncl_loss_embeddings", "ncl_grad", "apply_biases",
           "ncl_loss_all_positives", "ncl_loss_own_bias"]


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


def _positives_loss(L, y, f, g, positives, w_row, w_col):
    """The loss on logits ``L`` with row targets ``y`` and column ``j``'s positives
    ``P_j = {i : y_i = j}`` aggregated by ``positives``; ``f, g`` are used as given (they
    may carry a graph: :func:`ncl_loss_own_bias`)."""
    n, m = L.shape
    device = L.device
    rows = (y >= 0).nonzero().flatten()
    lse_row = torch.logsumexp(L + g[None, :], dim=1)
    term_row = lse_row[rows] - L[rows, y[rows]] - g[y[rows]]

    mask = y[:, None] == torch.arange(m, device=device)[None, :]      # (N, M): i in P_j
    cols = mask.any(0).nonzero().flatten()
    A = (L + f[:, None])[:, cols]
    Pm = mask[:, cols]
    lse_col = torch.logsumexp(A, dim=0)
    if positives == "all":
        target = torch.logsumexp(A.masked_fill(~Pm, -torch.inf), dim=0)
    elif positives == "mean":
        target = (A * Pm).sum(0) / Pm.sum(0)
    else:
        first = torch.where(Pm, torch.arange(n, device=device)[:, None], n).amin(0)
        target = A[first, torch.arange(cols.numel(), device=device)]
    term_col = lse_col - target
    loss_row = term_row.sum() / max(rows.numel(), 1)
    loss_col = term_col.sum() / max(cols.numel(), 1)
    return w_row * loss_row + w_col * loss_col


def _check_positives(positives):
    if positives not in ("all", "mean", "first"):
        raise ValueError(f"positives must be 'all', 'mean' or 'first', got {positives!r}")


def _weights(weights):
    if len(weights) != 2:
        raise ValueError(f"weights must be (w_row, w_col), got {weights!r}")
    return float(weights[0]), float(weights[1])


def ncl_loss_all_positives(
    scores,
    scale=1.0,
    *,
    row_targets,
    positives="all",
    n_iters=4,
    f=None,
    g=None,
    weights=(0.5, 0.5),
    row_mass=None,
    col_mass=None,
    dtype=torch.float64,
):
    """The NCL loss when column ``j`` (a video) has every row ``i`` with ``y_i = j`` (its
    captions) as a positive, not only its first one.

    ``P_j = {i : y_i = j}``; ``C = {j : P_j`` non-empty``}``. The row (text-to-video) term
    is :func:`ncl_loss`'s; the column (video-to-text) term replaces ``L[z_j, j] + f[z_j]``
    by an aggregate over ``P_j`` of ``a_ij = L_ij + f_i``:

    - ``positives="all"``: ``LSE_{i in P_j} a_ij``, so the term is
      ``-log sum_{i in P_j} softmax_i(L_.j + f)_i``: minus the log of the probability that
      video ``j`` retrieves *one of* its captions;
    - ``positives="mean"``: ``mean_{i in P_j} a_ij``, the mean of the per-caption
      cross-entropies over the same softmax;
    - ``positives="first"``: ``a_{z_j j}`` with ``z_j = min P_j``, which is
      :func:`ncl_loss` with those ``col_targets`` (a test).

    ``f, g`` are constants (detached), given or from ``sinkhorn(..., tol=None)``. Dense and
    naive on purpose: the mask ``[y_i = j]`` is formed as an N x M matrix.
    """
    check_matrix(scores, "scores")
    n, m = scores.shape
    device = scores.device
    _check_positives(positives)
    if (f is None) != (g is None):
        raise ValueError("pass both f and g, or neither (then they come from sinkhorn)")
    if f is None:
        res = sinkhorn(scores.detach(), scale_value(scale), row_mass=row_mass,
                       col_mass=col_mass, n_iters=n_iters, tol=None, dtype=dtype)
        f, g = res.f, res.g
    else:
        f = check_vector(f, n, "f", dtype, device)
        g = check_vector(g, m, "g", dtype, device)
    y = _targets(row_targets, n, m, "row_targets", device)
    L = masked_logits(scores.to(dtype), scale_tensor(scale, dtype, device))
    return _positives_loss(L, y, f, g, positives, *_weights(weights))


def ncl_loss_own_bias(
    scores,
    scale,
    f,
    g,
    *,
    block,
    row_targets,
    positives="first",
    weights=(0.5, 0.5),
    row_mass=None,
    col_mass=None,
    dtype=torch.float64,
):
    """:func:`ncl_loss_all_positives` on the leading ``block = (n, m)`` of ``scores``, with
    ``f, g`` the biases of the *whole* ``scores`` (a queue after the batch), and a gradient
    that also carries each bias's dependence on its own row or column.

    Each bias is replaced by a surrogate with the same value and the gradient of its
    half-step with the other side fixed, over the whole problem:
    ``f~_i = f_i + F_i - sg(F_i)``, ``F_i = log r_i - LSE_j(L_ij + g_j)``, and
    ``g~_j = g_j + G_j - sg(G_j)``, ``G_j = log c_j - LSE_i(L_ij + f_i)`` (``sg``: stop
    gradient; masses as in :func:`masses`). The value is the plain loss with ``f, g``.
    """
    check_matrix(scores, "scores")
    N, M = scores.shape
    device = scores.device
    n, m = block
    _check_positives(positives)
    f = check_vector(f, N, "f", dtype, device)
    g = check_vector(g, M, "g", dtype, device)
    y = _targets(row_targets, n, m, "row_targets", device)
    r, c = masses(N, M, row_mass, col_mass, dtype=dtype, device=device)
    L = masked_logits(scores.to(dtype), scale_tensor(scale, dtype, device))
    F = r.log() - torch.logsumexp(L + g[None, :], dim=1)
    G = c.log() - torch.logsumexp(L + f[:, None], dim=0)
    # a zero-mass row or column keeps its -inf bias (it has no dependence to carry)
    f_live = torch.where(r > 0, f + F - F.detach(), f)
    g_live = torch.where(c > 0, g + G - G.detach(), g)
    return _positives_loss(L[:n, :m], y, f_live[:n], g_live[:m], positives, *_weights(weights))
