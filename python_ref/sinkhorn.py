"""Float64 oracle for the masses and log-domain Sinkhorn-Knopp (docs/math.md sections 1, 2).

Naive on purpose: full matrices, ``torch.logsumexp``, no chunking. Every function takes
``dtype`` (default float64) and does all its arithmetic in it.
"""

import math
from collections import namedtuple

import torch

from ._common import check_matrix, check_vector, masked_logits, scale_tensor, scale_value

__all__ = [
    "masses",
    "row_lse",
    "col_lse",
    "SinkhornRef",
    "sinkhorn",
    "sinkhorn_embeddings",
    "sinkhorn_error",
]

SinkhornRef = namedtuple("SinkhornRef", ["f", "g", "n_iters", "error"])
SinkhornRef.__doc__ = """Result of :func:`sinkhorn`: potentials ``f`` (N), ``g`` (M), the number of
iterations performed and the row-marginal error (Python float) of the returned pair."""

_MASS_RTOL = 1e-5


def masses(n, m, row_mass=None, col_mass=None, *, dtype=torch.float64, device=None):
    """Row and column masses ``(r, c)`` by the rules of docs/math.md section 1.

    Defaults ``r_i = 1``, ``c_j = sum(r) / M``; when only one is given the other is uniform
    with the same total; when both are given their totals must agree to 1e-5 (relative).
    Decisions where the SPEC is silent: masses must be finite and >= 0 and the total must be
    > 0 (else ``ValueError``); ``device`` defaults to the given masses' device (else CPU).
    """
    if device is None:
        for x in (row_mass, col_mass):
            if isinstance(x, torch.Tensor):
                device = x.device
                break
    r = None if row_mass is None else _check_mass(row_mass, n, "row_mass", dtype, device)
    c = None if col_mass is None else _check_mass(col_mass, m, "col_mass", dtype, device)
    if r is None and c is None:
        r = torch.ones(n, dtype=dtype, device=device)
    if c is None:
        total = r.sum()
        if not total > 0:
            raise ValueError("row_mass: total mass must be > 0")
        c = torch.full((m,), float(total) / m, dtype=dtype, device=device)
    elif r is None:
        total = c.sum()
        if not total > 0:
            raise ValueError("col_mass: total mass must be > 0")
        r = torch.full((n,), float(total) / n, dtype=dtype, device=device)
    else:
        tr, tc = float(r.sum()), float(c.sum())
        if not (tr > 0 and tc > 0):
            raise ValueError(f"total masses must be > 0, got sum(row_mass)={tr}, sum(col_mass)={tc}")
        if abs(tr - tc) > _MASS_RTOL * max(tr, tc):
            raise ValueError(
                f"row_mass and col_mass totals must agree to {_MASS_RTOL} (relative): "
                f"sum(row_mass)={tr!r}, sum(col_mass)={tc!r}"
            )
    return r, c


def _check_mass(x, length, name, dtype, device):
    x = torch.as_tensor(x, device=device).detach().to(dtype)
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    if (x < 0).any():
        raise ValueError(f"{name} must be >= 0")
    return x


def row_lse(scores, scale=1.0, g=None, *, dtype=torch.float64):
    """``LSE_row_i(g) = logsumexp_j(scale * S_ij + g_j)`` (docs/math.md section 2), shape (N,).

    ``-inf`` entries are masks; a row that is all ``-inf`` gives ``-inf``. Differentiable
    (scores and a tensor scale keep their graph); no input checks.
    """
    S = scores.to(dtype)
    L = masked_logits(S, scale_tensor(scale, dtype, S.device))
    if g is not None:
        L = L + g.to(dtype)[None, :]
    return torch.logsumexp(L, dim=1)


def col_lse(scores, scale=1.0, f=None, *, dtype=torch.float64):
    """``LSE_col_j(f) = logsumexp_i(scale * S_ij + f_i)`` (docs/math.md section 2), shape (M,)."""
    S = scores.to(dtype)
    L = masked_logits(S, scale_tensor(scale, dtype, S.device))
    if f is not None:
        L = L + f.to(dtype)[:, None]
    return torch.logsumexp(L, dim=0)


def _error(L, f, g, r):
    lse = torch.logsumexp(L + g[None, :], dim=1)
    term = torch.where(r > 0, (torch.exp(f + lse) - r).abs(), torch.zeros_like(r))
    return float(term.sum() / r.sum())


def sinkhorn_error(scores, scale, f, g, *, row_mass=None, col_mass=None, dtype=torch.float64):
    """Row-marginal error of a pair (docs/math.md section 2), a Python float:
    ``sum_i |exp(f_i + LSE_row_i(g)) - r_i| / sum_i r_i``; rows with ``r_i == 0`` contribute 0."""
    n, m = scores.shape
    L = scale_value(scale) * scores.detach().to(dtype)
    r, _ = masses(n, m, row_mass, col_mass, dtype=dtype, device=scores.device)
    return _error(L, f.detach().to(dtype), g.detach().to(dtype), r)


def _neg_inf_like(x):
    return torch.full_like(x, -math.inf)


def sinkhorn(
    scores,
    scale=1.0,
    *,
    row_mass=None,
    col_mass=None,
    n_iters=100,
    tol=1e-4,
    check_every=10,
    init_g=None,
    dtype=torch.float64,
):
    """Log-domain Sinkhorn-Knopp on ``L = scale * S`` (docs/math.md section 2), the naive oracle.

    One iteration: ``f = log r - LSE_row(g)``, ``g = log c - LSE_col(f)``, starting from
    ``g = init_g`` (default 0) with ``g_j = -inf`` where ``c_j == 0``. Zero mass gives a
    ``-inf`` potential (never NaN). After iteration k, if ``tol`` is not None and
    ``k % check_every == 0`` and the error is ``<= tol``, stop. ``n_iters == 0`` returns
    ``f = 0`` (``-inf`` at zero-mass rows) and the start ``g``. Potentials are unshifted.

    Infeasibility: a row with positive mass whose first ``LSE_row`` (with the start ``g``) is
    ``-inf`` raises ``ValueError("... row i ...")`` (also when ``n_iters == 0``); likewise a
    column with positive mass after the first ``LSE_col`` (``"column j"``). Decision: a
    ``-inf`` in ``init_g`` is allowed and goes through the same check; NaN/+inf in scores
    or ``init_g`` raise ``ValueError`` (docs/math.md section 5). ``scale`` is used by value (no grad).
    """
    check_matrix(scores, "scores")
    n, m = scores.shape
    n_iters = int(n_iters)
    check_every = int(check_every)
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if tol is not None and not float(tol) >= 0:
        raise ValueError(f"tol must be >= 0 or None, got {tol}")
    device = scores.device
    s = scale_value(scale)
    L = s * scores.detach().to(dtype)  # -inf stays -inf since s > 0
    r, c = masses(n, m, row_mass, col_mass, dtype=dtype, device=device)
    log_r = torch.log(r)  # log 0 = -inf
    log_c = torch.log(c)

    if init_g is None:
        g = torch.zeros(m, dtype=dtype, device=device)
    else:
        g = check_vector(init_g, m, "init_g", dtype, device).clone()
    g = torch.where(c > 0, g, _neg_inf_like(g))

    def row_pass(g, check):
        lse = torch.logsumexp(L + g[None, :], dim=1)
        if check:
            bad = ((r > 0) & torch.isneginf(lse)).nonzero().flatten()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"infeasible problem: row {i} has positive mass but all its logits "
                    f"(plus the column potentials) are -inf"
                )
        return torch.where(r > 0, log_r - lse, _neg_inf_like(lse))

    def col_pass(f, check):
        lse = torch.logsumexp(L + f[:, None], dim=0)
        if check:
            bad = ((c > 0) & torch.isneginf(lse)).nonzero().flatten()
            if bad.numel():
                j = int(bad[0])
                raise ValueError(
                    f"infeasible problem: column {j} has positive mass but all its logits "
                    f"(plus the row potentials) are -inf"
                )
        return torch.where(c > 0, log_c - lse, _neg_inf_like(lse))

    if n_iters == 0:
        row_pass(g, check=True)
        f = torch.where(r > 0, torch.zeros_like(r), _neg_inf_like(r))
        return SinkhornRef(f, g, 0, _error(L, f, g, r))

    done = 0
    for k in range(1, n_iters + 1):
        f = row_pass(g, check=(k == 1))
        g = col_pass(f, check=(k == 1))
        done = k
        if tol is not None and k % check_every == 0 and _error(L, f, g, r) <= tol:
            break
    return SinkhornRef(f, g, done, _error(L, f, g, r))


def sinkhorn_embeddings(
    x,
    y,
    scale=1.0,
    *,
    row_mass=None,
    col_mass=None,
    n_iters=100,
    tol=1e-4,
    check_every=10,
    init_g=None,
    dtype=torch.float64,
):
    """:func:`sinkhorn` on ``S = x @ y.T`` formed in ``dtype`` (docs/math.md section 1 embedding form)."""
    S = x.detach().to(dtype) @ y.detach().to(dtype).T
    return sinkhorn(
        S,
        scale,
        row_mass=row_mass,
        col_mass=col_mass,
        n_iters=n_iters,
        tol=tol,
        check_every=check_every,
        init_g=init_g,
        dtype=dtype,
    )
