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

The loss is one op pair (``ncl_kernels::distributed_ncl_loss`` and its backward, overload
per backend) whose kernels run the collectives, on the group named by
``group.group_name``; the column-sized outputs the backward needs have a size only the
collective knows, which the fake implementation declares as a data-dependent size. So
``torch.compile(fullgraph=True)`` traces the loss without a graph break.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _library, _loss_math as LM, _validate as V
from ._dtypes import acc_dtype
from ._types import OptTensor, Scale, Weights
from .backends import derived, registry
from .nn import NAMES, NCLLoss

Tensor = torch.Tensor
NEG_INF = float("-inf")


def _check_group():
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ncl_kernels.distributed needs an initialized torch.distributed "
                           "process group (torch.distributed.init_process_group)")


def _group(name: str):
    # the op carries the group by name (ops take no Python objects); c10d resolves it
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


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


def _local_masses(row_mass, col_mass, acc):
    """This rank's mass slices, checked (no communication)."""
    r = None if row_mass is None else V.mass_values("row_mass", row_mass, acc)
    c = None if col_mass is None else V.mass_values("col_mass", col_mass, acc)
    return r, c


def _global_masses(r, c, x: Tensor, lay: _Layout, group):
    """docs/math.md section 1's defaults and total rule over the global batch."""
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



def _checked_problem(x, y, scale_t, scale_f, row_targets, col_targets, row_mass, col_mass,
                     group):
    """This rank's data checks, agreed by every rank; then the layout, the global targets
    and masses."""
    error = None
    try:
        s = V.scale_value(scale_t, scale_f)
        V.embeddings_values(x, y, ("x_local", "y_local"))
    except (TypeError, ValueError) as exc:
        error = exc
    _agree(error, x.device, group)
    lay = _Layout(x.shape[0], y.shape[0], x.device, group)
    yt, zt = V.default_targets(lay.N, lay.M, x.device)
    yt, local_z = yt[lay.row0:lay.row0 + x.shape[0]], None
    try:
        if row_targets is not None:
            yt = V.target_values("row_targets", row_targets, lay.M, "column")
        if col_targets is not None:
            local_z = V.target_values("col_targets", col_targets, lay.N, "row")
        r, c = _local_masses(row_mass, col_mass, acc_dtype(x.dtype))
    except (TypeError, ValueError) as exc:
        error = exc
    _agree(error, x.device, group)
    if local_z is not None:
        zt = _gather_rows(local_z, lay.cols, group)
    r, c = _global_masses(r, c, x, lay, group)
    return s, lay, yt, zt, r, c


def _forward_kernel(backend: str):
    def kernel(x, y, scale_t, scale_f, group_name, row_targets, col_targets, row_mass,
               col_mass, n_iters, w_row, w_col):
        group = _group(group_name)
        s, lay, yt, z, r, c = _checked_problem(x, y, scale_t, scale_f, row_targets,
                                               col_targets, row_mass, col_mass, group)
        acc = acc_dtype(x.dtype)
        row_lse, col_lse = (registry.resolve(backend, p, x.device.type, x.dtype)
                            for p in ("row_lse_xy", "col_lse_xy"))
        Y = _gather_rows(y, lay.cols, group)
        # (finite embeddings: every row pass is finite, so the local feasibility check of
        # solve() cannot fire on one rank alone; the column check sees replicated data)
        row = (lambda g_: row_lse(x, Y, s, g_))
        col = (lambda f_: _all_reduce_lse(col_lse(x, Y, s, f_), group))
        # (no fused step across ranks: the column LSE is merged over the ranks in between)
        b = LM.biases_and_lses(row, col, lambda g_, log_r: derived.iteration(row, col, g_,
                                                                             log_r),
                               r, c, n_iters, None, None)
        # coefficients over the *global* target sets (z is replicated: every rank has all
        # of C; R is counted over the ranks)
        n_targets = _all_sum((yt >= 0).to(acc).sum(), group)
        coef_row, coef_col = LM.coefficients(yt, z, w_row, w_col, acc, n_targets)
        # column j's target row lives on one rank: that rank adds its term
        z_here = z - lay.row0
        mine = (z >= 0) & (z_here >= 0) & (z_here < x.shape[0])
        z_local = torch.where(mine, z_here, torch.full_like(z, -1))
        targets = registry.resolve(backend, "target_logits_xy", x.device.type, x.dtype)
        t_row, t_col = targets(x, Y, s, yt, z_local)
        local = LM.assemble(b, t_row, t_col, yt, z_local, coef_row, coef_col)
        loss = LM.check_finite_loss(_all_sum(local, group))
        col0 = torch.tensor(lay.col0, dtype=torch.int64, device=x.device)
        # (an op's outputs must not alias its inputs: yt may be the caller's row_targets)
        return (loss, Y, b.f, b.g, b.lse_row, b.lse_col, coef_row, coef_col, yt.clone(),
                z_local, col0)
    return kernel


def _forward_fake(x, y, *rest):
    # the global column count is known only to the collective: a data-dependent size
    M = torch.library.get_ctx().new_dynamic_size()
    n, acc = x.shape[0], acc_dtype(x.dtype)
    vec = (lambda k, dt=acc: x.new_empty(k, dtype=dt))
    return (x.new_empty((), dtype=acc), x.new_empty(M, x.shape[1]), vec(n), vec(M), vec(n),
            vec(M), vec(n), vec(M), vec(n, torch.int64), vec(M, torch.int64),
            x.new_empty((), dtype=torch.int64))


def _backward_kernel(backend: str):
    def kernel(grad, x, Y, f, g, lse_row, lse_col, coef_row, coef_col, yt, z_local, col0,
               scale_t, scale_f, group_name, m_local, need_x):
        s = V.scale_value(scale_t, scale_f)
        grad = grad.to(coef_row.dtype)
        grad_xy = registry.resolve(backend, "ncl_grad_xy", x.device.type, x.dtype)
        # z_local is -1 for columns whose target row is on another rank: this block then
        # gets their softmax term (coef_col != 0) but not their "- [i = z_j]" term.
        dx, dY, ds = grad_xy(x, Y, s, f, g, lse_row, lse_col, coef_row * grad,
                             coef_col * grad, yt, z_local, need_dx=need_x, need_dy=True)
        dY = _all_sum(dY, _group(group_name))  # the only communication of the backward
        start = int(col0)
        dy = dY[start:start + m_local].clone()
        return (x.new_empty(0) if dx is None else dx), dy, ds
    return kernel


def _backward_fake(grad, x, Y, *rest):
    m_local = rest[-2]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            Y.new_empty(m_local, Y.shape[1]), x.new_empty((), dtype=acc_dtype(x.dtype)))


def _setup(ctx, inputs, output):
    x, y, scale_t, scale_f, group_name = inputs[:5]
    (_loss, Y, f, g, lse_row, lse_col, coef_row, coef_col, yt, z_local, col0) = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, Y, f, g, lse_row, lse_col, coef_row, coef_col, yt, z_local,
                          col0, scale_t)
    ctx.options = (scale_f, group_name, y.shape[0])


def _backward(backend: str):
    backward_op = _library.op("distributed_ncl_loss_backward", backend)

    def backward(ctx, grad, *_unused):
        *saved, scale_t = ctx.saved_tensors
        scale_f, group_name, m_local = ctx.options
        dx, dy, ds = backward_op(grad, *saved, scale_t, scale_f, group_name, m_local,
                                 ctx.needs_input_grad[0])
        dscale = ds.to(scale_t.dtype) if ctx.needs_input_grad[2] else None
        return ((dx if ctx.needs_input_grad[0] else None,
                 dy if ctx.needs_input_grad[1] else None, dscale) + (None,) * 9)
    return backward


_SAVED = ("Tensor x, Tensor Y, Tensor f, Tensor g, Tensor lse_row, Tensor lse_col, "
          "Tensor coef_row, Tensor coef_col, Tensor yt, Tensor z_local, Tensor col0")
_library.define("distributed_ncl_loss_backward",
                f"(Tensor grad, {_SAVED}, Tensor? scale_t, float scale_f, str group, "
                "int m_local, bool need_x) -> (Tensor, Tensor, Tensor)",
                _backward_kernel, _backward_fake)
_library.define("distributed_ncl_loss",
                "(Tensor x, Tensor y, Tensor? scale_t, float scale_f, str group, "
                "Tensor? row_targets, Tensor? col_targets, Tensor? row_mass, "
                "Tensor? col_mass, int n_iters, float w_row, float w_col) -> (Tensor loss, "
                "Tensor Y, Tensor f, Tensor g, Tensor lse_row, Tensor lse_col, "
                "Tensor coef_row, Tensor coef_col, Tensor yt, Tensor z_local, Tensor col0)",
                _forward_kernel, _forward_fake, autograd=(_backward, _setup))


def _options(x_local, y_local, scale, row_targets, col_targets, n_iters, weights, row_mass,
             col_mass, backend):
    """The metadata checks of this rank's arguments (traced Python)."""
    x, y = V.embeddings_meta(x_local, y_local, ("x_local", "y_local"))
    scale_t, scale_f = V.scale_meta(scale, x)
    V.iterations(n_iters, None, 1)
    w_row, w_col = V.weights(weights)
    _library.check_backend(backend, x.device)
    yt = None if row_targets is None else V.target_meta("row_targets", row_targets,
                                                        x.shape[0], x)
    zt = None if col_targets is None else V.target_meta("col_targets", col_targets,
                                                        y.shape[0], x)
    r = None if row_mass is None else V.mass_meta("row_mass", row_mass, x.shape[0], x)
    c = None if col_mass is None else V.mass_meta("col_mass", col_mass, y.shape[0], x)
    return x, y, scale_t, scale_f, yt, zt, r, c, w_row, w_col


def ncl_loss_embeddings(x_local: Tensor, y_local: Tensor, scale: Scale = 1.0, *,
                        group: Optional[dist.ProcessGroup] = None,
                        row_targets: OptTensor = None, col_targets: OptTensor = None,
                        n_iters: int = 4, weights: Weights = (0.5, 0.5),
                        row_mass: OptTensor = None, col_mass: OptTensor = None,
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
    arguments are refused, every rank raises: that rank its own ``ValueError`` or
    ``TypeError``, the others a ``ValueError`` naming that rank. (Under ``torch.compile``
    the metadata checks run while tracing, where a rank cannot tell the others: give every
    rank inputs of the same kinds, shapes aside.)
    """
    _check_group()
    group = dist.group.WORLD if group is None else group
    args = (x_local, y_local, scale, row_targets, col_targets, n_iters, weights, row_mass,
            col_mass, backend)
    if torch.compiler.is_compiling():
        opts = _options(*args)
    else:
        device = x_local.device if isinstance(x_local, Tensor) else torch.device("cpu")
        error = opts = None
        try:  # the checks of this rank's own arguments; every rank then agrees
            opts = _options(*args)
        except (TypeError, ValueError) as exc:
            error = exc
        _agree(error, device, group)
    x, y, scale_t, scale_f, yt, zt, r, c, w_row, w_col = opts
    return _library.op("distributed_ncl_loss", backend)(
        x, y, scale_t, scale_f, group.group_name, yt, zt, r, c, n_iters, w_row, w_col)[0]


def global_biases(x_local: Tensor, y_local: Tensor, scale: Scale = 1.0, *,
                  group: Optional[dist.ProcessGroup] = None, n_iters: int = 4,
                  backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(f_local, g)``: the Sinkhorn biases of the global problem (no gradient): this
    rank's row potentials (n_r,) and every column's (M,), replicated."""
    _check_group()
    group = dist.group.WORLD if group is None else group
    x, y, scale_t, scale_f, *_ = _options(x_local, y_local, scale, None, None, n_iters,
                                          (0.5, 0.5), None, None, backend)
    with torch.no_grad():
        out = _library.op("distributed_ncl_loss", backend)(
            x.detach(), y.detach(), None if scale_t is None else scale_t.detach(), scale_f,
            group.group_name, None, None, None, None, n_iters, 0.5, 0.5)
    return out[2], out[3]


# -- the module ---------------------------------------------------------------------------

GRADIENTS = ("open_clip", "global")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the ranks of ``group`` (each
    rank then holds the full derivative instead of its share)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_sum(grad.contiguous(), ctx.group), None


def scale_gradient(t: Tensor, factor: float) -> Tensor:
    """``t`` whose gradient is multiplied by ``factor`` on the way back (values unchanged)."""
    return _ScaleGrad.apply(t, factor) if t.requires_grad and factor != 1 else t


def sum_gradient_over_ranks(scale, group):
    """``scale`` whose gradient is summed over the ranks on the way back: every rank then
    holds the full ``d(loss)/d(scale)``, as open_clip's ``ClipLoss`` gives it."""
    if isinstance(scale, Tensor) and scale.requires_grad:
        return _SumGradOverRanks.apply(scale, group)
    return scale


class DistributedNCLLoss(NCLLoss):
    """:class:`ncl_kernels.NCLLoss` over a process group: the loss of the global batch.

    ``forward(text_features, video_features, scale, caption_to_video=None)`` takes this
    rank's captions (n_r, D) and videos (v_r, D) and returns, on every rank, the NCL loss
    of the global batch (every rank's batch, in rank order): the value
    :class:`ncl_kernels.NCLLoss` gives on the concatenated batch with
    ``queue_as_negatives=True, positives="first", bias_gradient=False, offset_penalty=0``
    (the options this module has; see below). It runs
    :func:`ncl_loss_embeddings` (the items are all-gathered once; the N x M block is
    never formed). Every rank must call it collectively with the same options.

    ``caption_to_video`` (n_r,) int64 holds *local* video indices (in ``[0, v_r)``, or -1):
    a rank's captions describe its own videos, as a data loader that yields (caption,
    video) batches gives them. Targets and masses are those of :class:`NCLLoss` (a video
    receives mass in proportion to its caption count; its video-to-text target is its first
    caption), over the global batch.

    Queue (``queue_size`` K > 0): **kept per rank.** Each rank keeps its own K most recent
    earlier captions and videos and appends them to its slice, so the global problem is
    every rank's ``[batch; queue]``: the queues of all ranks together are the W * K most
    recent entries of the global batch, which a gathered queue would hold too. Kept per
    rank, they cost no communication beyond the all-gather of the items that the loss
    runs anyway and 1/W of the memory of a replicated queue, and checkpoints stay per rank
    (each rank's ``state_dict()`` holds its own queue). With K a multiple of the per-rank
    batch sizes this is exactly :class:`NCLLoss` with ``queue_size = W * K`` on the
    concatenated batches (up to the order of rows and columns, which the loss does not
    see). Queued entries are negatives and take part in the normalization
    (``queue_as_negatives=True``; the biases-only queue of :class:`NCLLoss` has no
    distributed form here). Rank slices may differ in size. :class:`NCLLoss`'s training
    terms (``positives`` other than ``"first"``, ``bias_gradient``, ``offset_penalty``)
    have no distributed form either: with a queue, the per-item offsets can drift
    (docs/training.md says when and why).

    Gradients (``gradients``):

    * ``"open_clip"`` (default): what open_clip's ``ClipLoss(gather_with_grad=True)``
      gives: each rank's embeddings receive ``world_size * d(global loss)/d(local
      embeddings)`` and a tensor ``scale`` the full ``d(global loss)/d(scale)`` on every
      rank. DistributedDataParallel averages gradients over ranks, so the parameters then
      receive the exact gradient of the global loss: use it with DDP as is.
    * ``"global"``: the exact ``d(global loss)/d(local embeddings)`` and this rank's share
      of ``d/d(scale)`` (the shares sum to the full derivative), as
      :func:`ncl_loss_embeddings` gives them: sum the gradients over ranks (not DDP's
      average) for the exact gradient.

    Args:
        n_iters, weights, queue_size, embed_dim, backend: as in :class:`NCLLoss`.
        gradients: see above.
        group: the process group (default: the world), resolved at each call.
    """

    def __init__(self, n_iters: int = 20, weights: Weights = (0.5, 0.5), *,
                 queue_size: int = 0, embed_dim: Optional[int] = None,
                 gradients: str = "open_clip", group: Optional[dist.ProcessGroup] = None,
                 backend: str = "auto") -> None:
        super().__init__(n_iters, weights, queue_size=queue_size, queue_as_negatives=True,
                         embed_dim=embed_dim, mode="streaming", backend=backend,
                         positives="first", bias_gradient=False, offset_penalty=0.0)
        self.gradients = V.choice("gradients", gradients, GRADIENTS)
        self.group = group

    def forward(self, text_features: Tensor, video_features: Tensor, scale: Scale,
                caption_to_video: Optional[Tensor] = None) -> Tensor:
        _check_group()
        group = dist.group.WORLD if self.group is None else self.group
        error = None
        try:  # this rank's own checks, agreed by every rank before any other collective
            x, y = V.embeddings_meta(text_features, video_features, NAMES)
            n, v = x.shape[0], y.shape[0]
            c2v, z, row_mass, counts = self._batch_targets(n, v, caption_to_video, x)
            queue = self._queue(x)
        except (TypeError, ValueError) as exc:
            error = exc
        if not torch.compiler.is_compiling():
            device = (text_features.device if isinstance(text_features, Tensor)
                      else torch.device("cpu"))
            _agree(error, device, group)
        elif error is not None:
            raise error
        if self.gradients == "open_clip":
            world = float(dist.get_world_size(group))
            x, y = scale_gradient(x, world), scale_gradient(y, world)
            scale = sum_gradient_over_ranks(scale, group)
        X, Y, row_mass, col_mass = self._join_queue(x, y, row_mass, counts, queue)
        if queue is not None:
            # the two rings fill at different rates: the column masses take the rows'
            # total over the global problem (docs/math.md section 1), as in NCLLoss
            totals = _all_sum(torch.stack([row_mass.sum(), col_mass.sum()]), group)
            col_mass = col_mass * (totals[0] / totals[1])
        row_targets = col_targets = None
        if queue is not None or c2v is not None:
            lay = _Layout(X.shape[0], Y.shape[0], x.device, group)
            local_y, local_z = (V.default_targets(n, v, x.device) if c2v is None
                                else (c2v, z))
            row_targets = torch.full((X.shape[0],), -1, dtype=torch.int64, device=x.device)
            col_targets = torch.full((Y.shape[0],), -1, dtype=torch.int64, device=x.device)
            row_targets[:n] = torch.where(local_y >= 0, local_y + lay.col0, local_y)
            col_targets[:v] = torch.where(local_z >= 0, local_z + lay.row0, local_z)
        loss = ncl_loss_embeddings(X, Y, scale, group=group, row_targets=row_targets,
                                   col_targets=col_targets, n_iters=self.n_iters,
                                   weights=self.weights, row_mass=row_mass,
                                   col_mass=col_mass, backend=self.backend)
        if queue is not None:
            self._enqueue_batch(x, y, row_mass, counts)
        return loss

    def extra_repr(self) -> str:
        return (f"n_iters={self.n_iters}, weights={self.weights}, "
                f"queue_size={self.queue_size}, gradients={self.gradients!r}")
