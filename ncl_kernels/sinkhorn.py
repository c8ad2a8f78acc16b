"""The one log-domain Sinkhorn-Knopp driver (docs/math.md section 2) and its public entries.

The driver (:func:`solve`) sees the problem only through two callables, one iteration
``step(g, log_r)`` and a closing ``row_lse(g)``, so the dense form (a score matrix), the
streaming form (embeddings), the loss's bias solve and the distributed loss share every
line of the iteration, the stopping rule and the feasibility and overflow checks. The
public functions check metadata in (traced) Python and call one op,
``torch.ops.ncl_kernels.sinkhorn`` or ``sinkhorn_embeddings`` (overload per backend,
``_library.py``), which checks the data
and runs the driver: with ``tol=None`` both compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from . import _library, _materialize as M_, _validate as V
from ._dtypes import acc_dtype
from ._types import OptTensor, Scale
from .backends import registry

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

    def __init__(self, message: str, *, error: float, n_iters: int) -> None:
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


def _warm_start(init_g: Optional[Tensor], c: Tensor) -> Tensor:
    """``g`` to start from: ``init_g`` (default 0), with ``-inf`` at zero-mass columns.

    A warm start cannot remove a column (zero mass does): its ``-inf`` entries at columns of
    positive mass are raised to its smallest finite entry (0 when it has none), which leads
    to the same solution; any finite start does.
    """
    if init_g is None:
        g = torch.zeros_like(c)
    else:
        finite = torch.isfinite(init_g)
        low = torch.where(finite, init_g, torch.full_like(init_g, math.inf)).amin()
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
        g = torch.where(finite, init_g, low)
    return g.masked_fill(c == 0, NEG_INF)


def _check_finite(f: Tensor, g: Tensor, r: Tensor, c: Tensor) -> None:
    """Every potential of positive mass is finite, or the logits overflowed the
    accumulation dtype: raise instead of returning NaN or inf."""
    ok = (torch.isfinite(f) | (r == 0)).all() & (torch.isfinite(g) | (c == 0)).all()
    if not bool(ok):
        limit = torch.finfo(f.dtype).max
        raise ValueError(f"Sinkhorn's potentials are not finite: the logits (scale * scores) "
                         f"or their sums with the potentials overflow {f.dtype} (largest "
                         f"value {limit:.3g}); lower the scale or normalize the scores or "
                         f"embeddings")


def _check_feasible(lse: Tensor, mass: Tensor, what: str, against: str) -> None:
    bad = (lse == NEG_INF) & (mass > 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"infeasible problem: {what} {index} has positive mass but all its "
                         f"logits are -inf in the {against} of positive mass")


def solve(row_lse: Callable[[Tensor], Tensor], step: Callable[[Tensor, Tensor], tuple],
          r: Tensor, c: Tensor, *, n_iters: int, tol: Optional[float], check_every: int,
          init_g: Optional[Tensor] = None) -> _Solution:
    """Run Sinkhorn from ``g = init_g`` (default 0) and return potentials and the LSEs.

    ``step(g, log_r)`` is one iteration's work on the scores: ``(f, LSE_row(g),
    LSE_col(f))`` with ``f = log_r - LSE_row(g)`` (the primitive ``sinkhorn_step``: one
    read of the scores where a backend fuses it, two where it is derived); ``row_lse(g)``
    closes the last iteration. So the row pass that opens iteration k + 1 also gives the
    error of iteration k, and nothing is read twice: n_iters + 1 reads when fused, 2
    n_iters + 1 otherwise. With ``tol``, the error of iteration k is looked at when
    ``k % check_every == 0`` (at the start of the next step: a step that turns out not to
    be needed is the price of fusing). Host synchronizations: the two feasibility checks
    of the first iteration, each look, and the finiteness check of the result. Raises
    ``ValueError`` for an infeasible problem or overflowing logits; whether ``tol`` was
    reached is the caller's to judge (:func:`converged`).
    """
    log_r, log_c = torch.log(r), torch.log(c)
    g = _warm_start(init_g, c)
    f = torch.zeros_like(r).masked_fill(r == 0, NEG_INF)
    lse_col, done = None, 0
    for it in range(1, n_iters + 1):
        f_next, lse_row, lse_col_next = step(g, log_r)
        if it == 1:
            _check_feasible(lse_row, r, "row", "columns")
            _check_feasible(lse_col_next, c, "column", "rows")
        elif tol is not None and done % check_every == 0:
            error = _marginal_error(f, lse_row, r)   # of iteration `done` = it - 1
            if float(error) <= tol:
                _check_finite(f, g, r, c)
                return _Solution(f, g, lse_row, lse_col, done, error)
        f, lse_col = f_next, lse_col_next
        g = _potential(c, log_c, lse_col)
        done = it
    lse_row = row_lse(g)
    if n_iters == 0:
        _check_feasible(lse_row, r, "row", "columns")
    error = _marginal_error(f, lse_row, r)
    _check_finite(f, g, r, c)
    return _Solution(f, g, lse_row, lse_col, done, error)


def converged(done: int, error: Tensor, n_iters: int, tol: Optional[float], strict: bool,
              stacklevel: int = 3) -> None:
    """Ending at ``n_iters`` with the error above ``tol`` warns, or raises
    :class:`SinkhornConvergenceError` when ``strict`` (nothing to judge with ``tol=None``)."""
    if tol is None or done == 0 or done != n_iters:
        return
    value = float(error)
    if value > tol:
        message = (f"Sinkhorn did not reach tol={tol:g} in {done} iterations (marginal "
                   f"error {value:.3g}); raise n_iters or tol")
        if strict:
            raise SinkhornConvergenceError(message, error=value, n_iters=done)
        warnings.warn(message, SinkhornConvergenceWarning, stacklevel=stacklevel)


# -- the public entries and their ops -----------------------------------------------------

class Problem(NamedTuple):
    """The data half of a problem's validation, with the defaults filled in."""

    s: float                   # the scale's value
    r: Tensor                  # row masses
    c: Tensor                  # column masses
    init_g: Optional[Tensor]   # warm start (None: 0)


def problem_values(like: Tensor, n: int, m: int, scale_t: Optional[Tensor], scale_f: float,
                   row_mass: Optional[Tensor], col_mass: Optional[Tensor],
                   init_g: Optional[Tensor]) -> Problem:
    """Inside an op: the scale's value, the masses (defaults and total rule, docs/math.md
    section 1) and the warm start, checked."""
    s = V.scale_value(scale_t, scale_f)
    r, c = V.masses_values(row_mass, col_mass, n, m, like)
    return Problem(s, r, c, V.potential_values("init_g", init_g, acc_dtype(like.dtype)))


_SOLVE_OPTIONS = ("Tensor? scale_t, float scale_f, Tensor? row_mass, Tensor? col_mass, "
                  "Tensor? init_g, int n_iters, float? tol, int check_every")
_SOLUTION = "(Tensor f, Tensor g, Tensor n_done, Tensor error)"


def _solution_fake(like: Tensor, n: int, m: int):
    acc = acc_dtype(like.dtype)
    return (like.new_empty(n, dtype=acc), like.new_empty(m, dtype=acc),
            like.new_empty((), dtype=torch.int64), like.new_empty((), dtype=acc))


def run_dense(backend: str, S: Tensor, p: Problem, n_iters: int, tol: Optional[float],
              check_every: int) -> _Solution:
    """Sinkhorn on checked scores with backend ``backend``'s kernels."""
    row = registry.resolve(backend, "row_lse", S.device.type, S.dtype)
    step = registry.resolve(backend, "sinkhorn_step", S.device.type, S.dtype)
    return solve(lambda g: row(S, p.s, g), lambda g, log_r: step(S, p.s, g, log_r), p.r,
                 p.c, n_iters=n_iters, tol=tol, check_every=check_every, init_g=p.init_g)


def run_embeddings(backend: str, X: Tensor, Y: Tensor, p: Problem, n_iters: int,
                   tol: Optional[float], check_every: int) -> _Solution:
    """Sinkhorn on checked embeddings (``S = X @ Y.T``, streamed)."""
    row = registry.resolve(backend, "row_lse_xy", X.device.type, X.dtype)
    step = registry.resolve(backend, "sinkhorn_step_xy", X.device.type, X.dtype)
    return solve(lambda g: row(X, Y, p.s, g), lambda g, log_r: step(X, Y, p.s, g, log_r),
                 p.r, p.c, n_iters=n_iters, tol=tol, check_every=check_every,
                 init_g=p.init_g)


def _outputs(sol: _Solution):
    if not bool(torch.isfinite(sol.error)):
        # (only without iterations: f = 0 leaves exp(f + LSE_row) to overflow)
        raise ValueError(f"the marginal error of the returned potentials overflows "
                         f"{sol.error.dtype} (n_iters={sol.n_iters}: the logits are too "
                         f"large for f = 0); run at least one iteration or lower the scale")
    return sol.f, sol.g, torch.tensor(sol.n_iters), sol.error


def _dense_kernel(backend: str):
    def kernel(S, scale_t, scale_f, row_mass, col_mass, init_g, n_iters, tol, check_every,
               name="scores"):
        p = problem_values(S, *S.shape, scale_t, scale_f, row_mass, col_mass, init_g)
        V.scores_values(S, name, scale=p.s)
        return _outputs(run_dense(backend, S, p, n_iters, tol, check_every))
    return kernel


def _xy_kernel(backend: str):
    def kernel(X, Y, scale_t, scale_f, row_mass, col_mass, init_g, n_iters, tol, check_every,
               x_name="x", y_name="y"):
        p = problem_values(X, X.shape[0], Y.shape[0], scale_t, scale_f, row_mass, col_mass,
                           init_g)
        V.embeddings_values(X, Y, (x_name, y_name))
        return _outputs(run_embeddings(backend, X, Y, p, n_iters, tol, check_every))
    return kernel


# the caller's names of the inputs travel with them, for the messages of the data checks
_library.define("sinkhorn",
                f'(Tensor S, {_SOLVE_OPTIONS}, str name="scores") -> {_SOLUTION}', _dense_kernel,
                lambda S, *rest: _solution_fake(S, S.shape[0], S.shape[1]))
_library.define("sinkhorn_embeddings",
                f'(Tensor X, Tensor Y, {_SOLVE_OPTIONS}, str x_name="x", str y_name="y") -> '
                f"{_SOLUTION}", _xy_kernel,
                lambda X, Y, *rest: _solution_fake(X, X.shape[0], Y.shape[0]))


def _options(like: Tensor, n: int, m: int, scale, row_mass, col_mass, n_iters, tol,
             check_every, init_g, strict, backend):
    """The metadata checks shared by both forms (traced Python); the op checks the data."""
    V.flag("strict", strict)
    scale_t, scale_f = V.scale_meta(scale, like)
    V.iterations(n_iters, tol, check_every)
    r, c = V.masses_meta(row_mass, col_mass, n, m, like)
    g0 = V.potential_meta("init_g", init_g, m, like)
    _library.check_backend(backend, like.device)
    detach = (lambda t: None if t is None else t.detach())
    return (detach(scale_t), scale_f, r, c, detach(g0), n_iters,
            None if tol is None else float(tol), check_every)


def _result(f, g, done, error, n_iters, tol, strict) -> SinkhornResult:
    # with tol=None the count is known without reading the device (no sync, no graph break)
    n = n_iters if tol is None else int(done)
    converged(n, error, n_iters, tol, strict, stacklevel=4)
    return SinkhornResult(f, g, n, error)


def sinkhorn(scores: Tensor, scale: Scale = 1.0, *, row_mass: OptTensor = None,
             col_mass: OptTensor = None, n_iters: int = 100,
             tol: Optional[float] = 1e-4, check_every: int = 10, init_g: OptTensor = None,
             backend: str = "auto", strict: bool = False) -> SinkhornResult:
    """Log-domain Sinkhorn on the logits ``scale * scores`` (docs/math.md section 2).

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
    S = V.scores_meta(scores)
    N, M = S.shape
    opts = _options(S, N, M, scale, row_mass, col_mass, n_iters, tol, check_every, init_g,
                    strict, backend)
    return _result(*_library.op("sinkhorn", backend)(S.detach(), *opts, "scores"), n_iters, tol,
                   strict)


def sinkhorn_embeddings(x: Tensor, y: Tensor, scale: Scale = 1.0, *,
                        row_mass: OptTensor = None, col_mass: OptTensor = None,
                        n_iters: int = 100, tol: Optional[float] = 1e-4,
                        check_every: int = 10, init_g: OptTensor = None,
                        backend: str = "auto",
                        strict: bool = False, materialize: Optional[bool] = None,
                        memory_budget: Optional[int] = None) -> SinkhornResult:
    """:func:`sinkhorn` on ``scores = x @ y.T``, streamed or formed once.

    ``x`` (N, D) and ``y`` (M, D) share dtype and device. The scores are formed in float32
    (float64 for float64 inputs). Streaming forms them a tile or a chunk of rows at a time
    in every pass, so memory stays O((N + M) * D + chunk); forming S once (float32, then the
    dense passes) is faster where it fits. ``materialize=None`` decides by the cost model of
    ``ncl_kernels/_materialize.py`` under ``memory_budget`` bytes (default 256 MiB);
    ``True`` forms S whatever its size, ``False`` always streams. The other options are
    those of :func:`sinkhorn`.
    """
    return embeddings_solution(x, y, scale, ("x", "y"), row_mass=row_mass, col_mass=col_mass,
                               n_iters=n_iters, tol=tol, check_every=check_every,
                               init_g=init_g, backend=backend, strict=strict,
                               materialize=materialize, memory_budget=memory_budget)


def embeddings_solution(x, y, scale, names, *, row_mass, col_mass, n_iters, tol, check_every,
                        init_g, backend, strict, materialize, memory_budget) -> SinkhornResult:
    """:func:`sinkhorn_embeddings` with the caller's names for ``x`` and ``y``."""
    x, y = V.embeddings_meta(x, y, names)
    N, M = x.shape[0], y.shape[0]
    opts = _options(x, N, M, scale, row_mass, col_mass, n_iters, tol, check_every, init_g,
                    strict, backend)
    # a tol usually stops early: count the iterations up to the second look
    iters = n_iters if tol is None else min(n_iters, 2 * check_every)
    if M_.choose(materialize, memory_budget, x, y, passes=2 * iters + 1, backward=False):
        S = M_.checked_product(x.detach(), y.detach(), names)
        out = _library.op("sinkhorn", backend)(S, *opts, f"{names[0]} @ {names[1]}.T")
    else:
        out = _library.op("sinkhorn_embeddings", backend)(x.detach(), y.detach(), *opts, *names)
    return _result(*out, n_iters, tol, strict)
