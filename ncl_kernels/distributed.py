"""The NCL loss of a global batch spread over a ``torch.distributed`` process group.

Each rank holds a slice of the queries (``x_local``, rows) and a slice of the items
(``y_local``, columns); the global batch is their concatenation in rank order (slices may
have different sizes, even zero rows is not allowed: every rank holds at least one row and
one column). Every rank returns the loss of the global batch.

How the work is split (the N x M block is never formed, let alone communicated):

* the items are all-gathered once (M x D), so each rank streams its own rows against
  every column: its row LSEs are local;
* a column LSE is the merge of every rank's partial over its rows: an all-reduce of the
  partial maxima, then of the sums rescaled to that maximum (two M-vectors);
* the row potentials ``f`` stay local, the column potentials ``g`` are replicated;
* the loss is an all-reduce of each rank's share (its rows' terms, and the column terms
  whose target row it holds);
* backward: each rank computes the gradient block of its own rows, which gives its
  ``dx`` completely and a partial ``dY`` (M x D) that is all-reduced; each rank keeps the
  rows of its own ``y_local``.

Gradients and DistributedDataParallel. Backward gives each rank exactly
``d(global loss)/d(x_local)`` and ``d(global loss)/d(y_local)``; for a tensor ``scale`` it
gives this rank's *share* of ``d(global loss)/d(scale)`` (the shares sum to the full
derivative over the ranks). So for any parameter shared by all ranks (the encoders, the
logit scale), the sum over ranks of the per-rank gradients is the exact gradient of the
global loss. DDP *averages* gradients over ranks, so with DDP the parameters receive
``grad / world_size``; multiply the loss by ``world_size`` (or the learning rate) to get
the exact gradient of the global loss. Every rank must call backward with the same
upstream gradient (as ``loss.backward()`` on every rank does): the backward runs a
collective.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from . import _validate as V
from ._ops import _biases_and_lses
from .backends import get as get_backend
from .backends.base import acc_dtype

Tensor = torch.Tensor
NEG_INF = float("-inf")


def _sizes(n: int, m: int, device, group) -> List[List[int]]:
    """``[[n_0, m_0], [n_1, m_1], ...]``: every rank's local row and column counts."""
    world = dist.get_world_size(group)
    mine = torch.tensor([n, m], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def _gather_rows(t: Tensor, sizes: List[int], group) -> Tensor:
    """All-gather rows of different counts (padded to the largest, then trimmed)."""
    pad = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    pad[:t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _all_reduce_lse(partial: Tensor, group) -> Tensor:
    """``log sum_ranks exp(partial)`` per entry: a max, then a sum rescaled to it."""
    top = partial.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = top.masked_fill(top == NEG_INF, 0.0)  # all -inf: keep -inf, never NaN
    total = torch.exp(partial - top)
    dist.all_reduce(total, group=group)
    return torch.log(total) + top


def _agree(error: Optional[Exception], device, group) -> None:
    """Raise on every rank when any rank has an error, instead of leaving the others
    waiting in the next collective: the rank's own error, or one naming the other rank."""
    flag = torch.tensor([0 if error is None else 1 + dist.get_rank(group)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(flag):
        raise ValueError(f"rank {int(flag) - 1} refused its input (see the error raised on "
                         f"that rank); no rank computed the loss")


def _all_sum(t: Tensor, group) -> Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


class _Layout:
    """Global sizes and this rank's offsets, from one all-gather of the local sizes."""

    def __init__(self, n_local: int, m_local: int, device, group):
        both = _sizes(n_local, m_local, device, group)
        self.rows = [b[0] for b in both]
        self.cols = [b[1] for b in both]
        rank = dist.get_rank(group)
        self.N, self.M = sum(self.rows), sum(self.cols)
        self.row0, self.col0 = sum(self.rows[:rank]), sum(self.cols[:rank])


class _DistLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale_t, s, be, lay, group, yt, z, r, c, n_iters, weights):
        acc = acc_dtype(x.dtype)
        Y = _gather_rows(y, lay.cols, group)
        # (finite embeddings: every row pass is finite, so the local feasibility check of
        # solve() cannot fire on one rank alone; the column check sees replicated data)
        fw = _biases_and_lses(lambda g_: be.row_lse_xy(x, Y, s, g_),
                              lambda f_: _all_reduce_lse(be.col_lse_xy(x, Y, s, f_), group),
                              r, c, n_iters, None, None)
        # coefficients over the *global* target sets
        has_y = (yt >= 0).to(acc)
        n_targets = _all_sum(has_y.sum(), group).clamp(min=1)
        coef_row = has_y * (weights[0] / n_targets)
        has_z = (z >= 0).to(acc)   # z is replicated: every rank has all of C
        coef_col = has_z * (weights[1] / has_z.sum().clamp(min=1))
        # column j's target row lives on one rank: that rank adds its term
        z_here = z - lay.row0
        mine = (z >= 0) & (z_here >= 0) & (z_here < x.shape[0])
        z_local = torch.where(mine, z_here, torch.full_like(z, -1))
        zero = torch.zeros((), dtype=acc, device=x.device)
        t_row = (x.to(acc) * Y[yt.clamp(min=0)].to(acc)).sum(1) * s
        row = torch.where(yt >= 0, coef_row * (fw.lse_row - t_row - fw.g[yt.clamp(min=0)]),
                          zero).sum()
        zc = z_local.clamp(min=0)
        t_col = (x[zc].to(acc) * Y.to(acc)).sum(1) * s
        col = torch.where(mine, coef_col * (fw.lse_col - t_col - fw.f[zc]), zero).sum()
        loss = _all_sum(row + col, group)
        ctx.save_for_backward(x, Y, fw.f, fw.g, fw.lse_row, fw.lse_col, coef_row, coef_col,
                              yt, z_local)
        ctx.s, ctx.be, ctx.lay, ctx.group = s, be, lay, group
        ctx.scale_dtype = None if scale_t is None else scale_t.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, Y, f, g, lse_row, lse_col, coef_row, coef_col, yt, z_local = ctx.saved_tensors
        grad = grad.to(coef_row.dtype)
        # z_local is -1 for columns whose target row is on another rank: this block then
        # gets their softmax term (coef_col != 0) but not their "- [i = z_j]" term.
        dx, dY, ds = ctx.be.ncl_grad_xy(x, Y, ctx.s, f, g, lse_row, lse_col, coef_row * grad,
                                        coef_col * grad, yt, z_local,
                                        need_dx=ctx.needs_input_grad[0], need_dy=True)
        dY = _all_sum(dY, ctx.group)     # the only communication of the backward
        lay = ctx.lay
        dy = dY[lay.col0:lay.col0 + lay.cols[dist.get_rank(ctx.group)]]
        dscale = ds.to(ctx.scale_dtype) if ctx.needs_input_grad[2] else None
        return (dx, dy if ctx.needs_input_grad[1] else None, dscale) + (None,) * 10


def _local_masses(row_mass, col_mass, x: Tensor, m_local: int):
    """This rank's mass slices, checked (no communication)."""
    r = None if row_mass is None else V._mass("row_mass", row_mass, x.shape[0], x)
    c = None if col_mass is None else V._mass_values(
        "col_mass", V._mass_meta("col_mass", col_mass, m_local, x))
    return r, c


def _global_masses(r, c, x: Tensor, lay: _Layout, group):
    """SPEC.md section 1's defaults and total rule over the global batch."""
    acc, dev = acc_dtype(x.dtype), x.device
    c = None if c is None else _gather_rows(c, lay.cols, group)
    if r is None and c is None:
        r = torch.ones(x.shape[0], dtype=acc, device=dev)
    total_r = None if r is None else float(_all_sum(r.sum(), group))
    if r is None:
        r = torch.full((x.shape[0],), float(c.sum()) / lay.N, dtype=acc, device=dev)
    if c is None:
        c = torch.full((lay.M,), total_r / lay.M, dtype=acc, device=dev)
    if total_r is not None:  # the same numbers on every rank: all raise together
        tc = float(c.sum())
        if abs(total_r - tc) > V.MASS_RTOL * max(total_r, tc):
            raise ValueError(f"row_mass and col_mass must have the same total over all ranks "
                             f"(to {V.MASS_RTOL:g} relative); got {total_r:.9g} and {tc:.9g}")
    return r, c


def ncl_loss_embeddings(x_local: Tensor, y_local: Tensor, scale=1.0, *, group=None,
                        row_targets: Optional[Tensor] = None,
                        col_targets: Optional[Tensor] = None, n_iters: int = 4,
                        weights=(0.5, 0.5), row_mass=None, col_mass=None,
                        backend: str = "auto") -> Tensor:
    """:func:`ncl_kernels.ncl_loss_embeddings` of the global batch, from local slices.

    Args:
        x_local: this rank's queries (n_r, D); the global X is the rank-ordered concat.
        y_local: this rank's items (m_r, D); likewise.
        scale: the same value on every rank (a number or a 0-dim tensor).
        group: the process group (default: the world).
        row_targets: (n_r,) int64 *global* column indices or -1; default: global row i
            targets global column i below ``min(N, M)``.
        col_targets: (m_r,) int64 *global* row indices or -1; default likewise.
        row_mass, col_mass: this rank's slices of the masses (defaults as in
            :func:`ncl_kernels.sinkhorn`, over the global batch).
        n_iters, weights, backend: as in :func:`ncl_kernels.ncl_loss_embeddings`.

    Returns:
        The global loss (the same value on every rank). See the module docstring for the
        gradients and how they compose with DistributedDataParallel.

    Every rank must call this collectively with the same options. When one rank's
    arguments are refused, every rank raises: that rank
    its own ``ValueError``/``TypeError``, the others a ``ValueError`` naming that rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ncl_kernels.distributed needs an initialized torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    device = x_local.device if isinstance(x_local, Tensor) else torch.device("cpu")
    error = None
    try:  # the checks of this rank's own arguments; every rank then agrees
        x, y = V.embeddings(x_local, y_local, ("x_local", "y_local"))
        scale_t = scale if isinstance(scale, Tensor) else None
        s = V.scale(scale)
        V.iterations(n_iters, None, 1)
        w = V.weights(weights)
        be = get_backend(backend, x.device)
    except (TypeError, ValueError) as exc:
        error = exc
    _agree(error, device, group)
    lay = _Layout(x.shape[0], y.shape[0], x.device, group)
    rank = dist.get_rank(group)
    yt, zt = V.default_targets(lay.N, lay.M, x.device)
    yt, local_z = yt[lay.row0:lay.row0 + x.shape[0]], None
    try:
        if row_targets is not None:
            yt = V._target_values("row_targets", V._target_meta(
                "row_targets", row_targets, x.shape[0], x), lay.M, "column")
        if col_targets is not None:
            local_z = V._target_values("col_targets", V._target_meta(
                "col_targets", col_targets, lay.cols[rank], x), lay.N, "row")
        r, c = _local_masses(row_mass, col_mass, x, lay.cols[rank])
    except (TypeError, ValueError) as exc:
        error = exc
    _agree(error, x.device, group)
    if local_z is not None:
        zt = _gather_rows(local_z, lay.cols, group)
    r, c = _global_masses(r, c, x, lay, group)
    return _DistLoss.apply(x, y, scale_t, s, be, lay, group, yt, zt, r, c, n_iters, w)
