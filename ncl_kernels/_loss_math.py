"""The NCL loss's math, shared by the dense, streaming and distributed forms.

docs/math.md section 3: the biases (solved unless given) with ``LSE_row(g)`` and
``LSE_col(f)``, the per-row and per-column coefficients ``w / |R|`` and ``w / |C|``, the
loss assembled from LSEs and target logits, and the checks that keep it finite. The op
wrappers (``_loss_ops.py``, ``distributed.py``) only move tensors in and out of these.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import _validate as V
from ._dtypes import acc_dtype
from .sinkhorn import problem_values, solve

Tensor = torch.Tensor
NEG_INF = float("-inf")


class Biases(NamedTuple):
    f: Tensor
    g: Tensor
    lse_row: Tensor
    lse_col: Tensor


class LossProblem(NamedTuple):
    s: float
    y: Tensor
    z: Tensor
    r: Tensor
    c: Tensor
    f: Optional[Tensor]
    g: Optional[Tensor]


def loss_problem(like: Tensor, n: int, m: int, scale_t, scale_f, row_targets, col_targets,
                 row_mass, col_mass, f, g) -> LossProblem:
    """Inside an op: the data half of the loss's validation, and the defaults (docs/math.md
    sections 1, 3)."""
    acc = acc_dtype(like.dtype)
    p = problem_values(like, n, m, scale_t, scale_f, row_mass, col_mass, None)
    y, z = V.targets_values(row_targets, col_targets, n, m, like.device)
    return LossProblem(p.s, y, z, p.r, p.c, V.potential_values("f", f, acc),
                       V.potential_values("g", g, acc))


def biases_and_lses(row_lse, col_lse, step, r, c, n_iters, f, g) -> Biases:
    """``f, g`` (solved unless given) with ``LSE_row(g)`` and ``LSE_col(f)``.

    After a solve, the last step already holds ``LSE_col(f)`` and the closing row pass
    ``LSE_row(g)``, so the forward costs no pass beyond the Sinkhorn iterations.
    ``step(g, log_r)`` is one iteration (see :func:`ncl_kernels.sinkhorn.solve`).
    """
    if f is None:
        sol = solve(row_lse, step, r, c, n_iters=n_iters, tol=None, check_every=1)
        f, g, lse_row, lse_col = sol.f, sol.g, sol.lse_row, sol.lse_col
    else:
        # given biases may be the caller's tensors: outputs of an op must not alias inputs
        f, g = f.clone(), g.clone()
        lse_row, lse_col = row_lse(g), None
    if lse_col is None:
        lse_col = col_lse(f)
    return Biases(f, g, lse_row, lse_col)


def coefficients(y: Tensor, z: Tensor, w_row: float, w_col: float, acc,
                 n_row_terms: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-row ``w_row / |R|`` and per-column ``w_col / |C|`` (0 without a target).

    An empty R (or C) contributes 0 to the loss: the mean over no terms is taken as 0.
    ``n_row_terms`` overrides ``|R|`` (the distributed loss counts R over every rank).
    """
    has_y, has_z = (y >= 0).to(acc), (z >= 0).to(acc)
    count = has_y.sum() if n_row_terms is None else n_row_terms
    coef_row = has_y * (w_row / count.clamp(min=1))
    coef_col = has_z * (w_col / has_z.sum().clamp(min=1))
    return coef_row, coef_col


def check_targets(b: Biases, y: Tensor, z: Tensor) -> None:
    """A loss term whose target has a ``-inf`` potential (zero mass, or given biases) would
    be infinite: refuse it, naming the target."""
    for name, idx, pot, what, other, why in (
            ("row_targets", y, b.g, "row", "column", "col_mass or g"),
            ("col_targets", z, b.f, "column", "row", "row_mass or f")):
        bad = (idx >= 0) & (pot[idx.clamp(min=0)] == NEG_INF)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: {what} {i}'s target {other} {int(idx[i])} has potential "
                             f"-inf (zero mass or a -inf bias; see {why}), so its loss term "
                             f"would be infinite; give it positive mass or set the target "
                             f"to -1")


def assemble(b: Biases, t_row: Tensor, t_col: Tensor, y: Tensor, z: Tensor,
             coef_row: Tensor, coef_col: Tensor) -> Tensor:
    """``sum_R coef (LSE_row - L_iy - g_y) + sum_C coef (LSE_col - L_zj - f_z)``."""
    zero = torch.zeros((), dtype=t_row.dtype, device=t_row.device)
    row_terms = b.lse_row - t_row - b.g[y.clamp(min=0)]
    col_terms = b.lse_col - t_col - b.f[z.clamp(min=0)]
    # rows/columns without a target may hold anything (even inf); keep them out of the sum
    return (torch.where(y >= 0, coef_row * row_terms, zero).sum()
            + torch.where(z >= 0, coef_col * col_terms, zero).sum())


def check_finite_loss(loss: Tensor) -> Tensor:
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"the loss is not finite ({float(loss)}): the logits (scale * "
                         f"scores) overflow {loss.dtype}; lower the scale or normalize the "
                         f"scores or embeddings")
    return loss
