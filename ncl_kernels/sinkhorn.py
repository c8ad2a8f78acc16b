"""The one log-domain Sinkhorn-Knopp driver (SPEC.md section 2) and its public entries.

The driver sees the problem only through two callables, ``row_lse(g)`` and ``col_lse(f)``,
so the dense form (a score matrix) and the streaming form (embeddings) share every line of
the iteration, the stopping rule and the feasibility checks.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional

import torch

from . import _validate as V
from .backends import get as get_backend

Tensor = torch.Tensor
NEG_INF = float("-inf")


class SinkhornResult(NamedTuple):
    """Potentials ``f`` (N), ``g`` (M), iterations run, and the final marginal error.

    ``error`` is a 0-dim tensor (no host synchronization is needed to return it):
    ``sum_i |exp(f_i + LSE_row_i(g)) - r_i| / sum_i r_i`` for the returned ``f, g``.
    """

    f: Tensor
    g: Tensor
    n_iters: int
    error: Tensor


class SinkhornConvergenceWarning(RuntimeWarning):
    """Sinkhorn stopped at ``n_iters`` with its marginal error still above ``tol``."""


class SinkhornConvergenceError(RuntimeError):
    """``strict=True``: Sinkhorn stopped at ``n_iters`` with its error still above ``tol``.

    ``error`` (a float) and ``n_iters`` say how far it got.
    """

    def __init__(self, message: str, *, error: float, n_iters: int):
        super().__init__(message)
        self.error, self.n_iters = error, n_iters


class _Solution(NamedTuple):
    f: Tensor
    g: Tensor
    lse_row: Tensor            # LSE_row(g) for the final g: the loss reuses it
    lse_col: Optional[Tensor]  # LSE_col(f) for the final f (None when no iteration ran)
    n_iters: int
    error: Tensor


def _potential(mass: Tensor, log_mass: Tensor, lse: Tensor) -> Tensor:
    # zero mass removes the row/column: -inf, never (-inf) - (-inf) = NaN
    return torch.where(mass > 0, log_mass - lse, torch.full_like(lse, NEG_INF))


def _marginal_error(f: Tensor, lse_row: Tensor, r: Tensor) -> Tensor:
    return (torch.exp(f + lse_row) - r).abs().sum() / r.sum()


def _check_feasible(lse: Tensor, mass: Tensor, what: str, against: str) -> None:
    bad = (lse == NEG_INF) & (mass > 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"infeasible problem: {what} {index} has positive mass but all its "
                         f"logits are -inf in the {against} of positive mass")


def solve(row_lse: Callable[[Optional[Tensor]], Tensor],
          col_lse: Callable[[Optional[Tensor]], Tensor],
          r: Tensor, c: Tensor, *, n_iters: int, tol: Optional[float], check_every: int,
          init_g: Optional[Tensor] = None, strict: bool = False) -> _Solution:
    """Run Sinkhorn from ``g = init_g`` (default 0) and return potentials and the LSEs.

    Pass count: one row pass to start, then a column and a row pass per iteration; the row
    pass that closes iteration k gives both the error of iteration k and the ``f`` of
    iteration k + 1, so nothing is read twice. Host synchronizations: the two feasibility
    checks of the first iteration, plus one every ``check_every`` iterations when ``tol``
    is set. Ending at ``n_iters`` with the error above ``tol`` warns, or raises
    :class:`SinkhornConvergenceError` when ``strict``.
    """
    log_r, log_c = torch.log(r), torch.log(c)
    g = torch.zeros_like(c) if init_g is None else init_g.clone()
    g = g.masked_fill(c == 0, NEG_INF)
    f = torch.zeros_like(r).masked_fill(r == 0, NEG_INF)
    lse_row = row_lse(g)
    _check_feasible(lse_row, r, "row", "columns")
    lse_col, error, done = None, None, 0
    for it in range(1, n_iters + 1):
        f = _potential(r, log_r, lse_row)
        lse_col = col_lse(f)
        if it == 1:
            _check_feasible(lse_col, c, "column", "rows")
        g = _potential(c, log_c, lse_col)
        lse_row = row_lse(g)
        done, error = it, None
        if tol is not None and it % check_every == 0:
            error = _marginal_error(f, lse_row, r)
            if float(error) <= tol:
                break
    if error is None:
        error = _marginal_error(f, lse_row, r)
    if tol is not None and done > 0 and done == n_iters and float(error) > tol:
        message = (f"Sinkhorn did not reach tol={tol:g} in {done} iterations (marginal "
                   f"error {float(error):.3g}); raise n_iters or tol")
        if strict:
            raise SinkhornConvergenceError(message, error=float(error), n_iters=done)
        warnings.warn(message, SinkhornConvergenceWarning, stacklevel=3)
    return _Solution(f, g, lse_row, lse_col, done, error)


def _problem(like: Tensor, n: int, m: int, scale, row_mass, col_mass, n_iters, tol,
             check_every, init_g, strict):
    """Validate the options shared by both forms; returns ``(s, r, c, init_g)``."""
    V.flag("strict", strict)
    s = V.scale(scale)
    V.iterations(n_iters, tol, check_every)
    r, c = V.masses(row_mass, col_mass, n, m, like)
    return s, r, c, V.potential("init_g", init_g, m, like)


def sinkhorn(scores: Tensor, scale=1.0, *, row_mass=None, col_mass=None, n_iters: int = 100,
             tol: Optional[float] = 1e-4, check_every: int = 10, init_g=None,
             backend: str = "auto", strict: bool = False) -> SinkhornResult:
    """Log-domain Sinkhorn on the logits ``scale * scores`` (SPEC.md section 2).

    Args:
        scores: (N, M) float32/float64/bfloat16/float16; rows may be strided, columns not.
            ``-inf`` entries are masks.
        scale: ``s > 0``, a number or a 0-dim tensor (its value is used; no gradient flows
            through the potentials).
        row_mass, col_mass: masses ``r`` (N) and ``c`` (M); defaults ``r = 1``,
            ``c = sum(r) / M``. Zero mass removes a row/column (its potential is ``-inf``).
        n_iters: maximum iterations (0 returns ``f = 0``, ``g = init_g``).
        tol: stop once the marginal error is ``<= tol``, looked at every ``check_every``
            iterations; ``None`` runs exactly ``n_iters`` with no per-iteration sync.
            Ending at ``n_iters`` above ``tol`` warns (:class:`SinkhornConvergenceWarning`).
        init_g: warm start for ``g``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` (see
            :func:`backends`; ``"auto"`` picks ``"cpu"`` for CPU tensors when it is built,
            and for CUDA tensors the fastest of ``"cuda"``/``"triton"`` per primitive).
        strict: ending at ``n_iters`` above ``tol`` raises
            :class:`SinkhornConvergenceError` instead of warning (no effect with
            ``tol=None``).

    Returns:
        :class:`SinkhornResult` ``(f, g, n_iters, error)``; potentials are float32 (float64
        for float64 scores), unshifted.

    Raises:
        ValueError: bad arguments, or an infeasible problem (a row/column of positive mass
            whose logits are all ``-inf``), naming the row or column.
        SinkhornConvergenceError: ``strict=True`` and ``tol`` was not reached.
    """
    S = V.scores(scores)
    N, M = S.shape
    s, r, c, init_g = _problem(S, N, M, scale, row_mass, col_mass, n_iters, tol,
                               check_every, init_g, strict)
    be = get_backend(backend, S.device)
    with torch.no_grad():
        sol = solve(lambda g: be.row_lse(S, s, g), lambda f: be.col_lse(S, s, f), r, c,
                    n_iters=n_iters, tol=tol, check_every=check_every, init_g=init_g,
                    strict=strict)
    return SinkhornResult(sol.f, sol.g, sol.n_iters, sol.error)


def sinkhorn_embeddings(x: Tensor, y: Tensor, scale=1.0, *, row_mass=None, col_mass=None,
                        n_iters: int = 100, tol: Optional[float] = 1e-4,
                        check_every: int = 10, init_g=None,
                        backend: str = "auto", strict: bool = False) -> SinkhornResult:
    """:func:`sinkhorn` on ``scores = x @ y.T`` without materializing it.

    ``x`` (N, D) and ``y`` (M, D) share dtype and device. The product is formed in float32
    (float64 for float64 inputs) a chunk of rows at a time, so memory stays
    O((N + M) * D + chunk * M). The options are those of :func:`sinkhorn`.
    """
    x, y = V.embeddings(x, y)
    N, M = x.shape[0], y.shape[0]
    s, r, c, init_g = _problem(x, N, M, scale, row_mass, col_mass, n_iters, tol,
                               check_every, init_g, strict)
    be = get_backend(backend, x.device)
    with torch.no_grad():
        sol = solve(lambda g: be.row_lse_xy(x, y, s, g), lambda f: be.col_lse_xy(x, y, s, f),
                    r, c, n_iters=n_iters, tol=tol, check_every=check_every, init_g=init_g,
                    strict=strict)
    return SinkhornResult(sol.f, sol.g, sol.n_iters, sol.error)
