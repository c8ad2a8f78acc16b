"""The NCL loss as ``torch.library`` ops: the boundary ``torch.compile`` sees.

Five ops, each with an overload per backend (``_library.py``):

    ncl_kernels::ncl_loss                        dense forward -> (loss, f, g, lse_row, lse_col)
    ncl_kernels::ncl_loss_backward               dense backward -> (dscores or empty, dscale_sum)
    ncl_kernels::ncl_loss_backward_              dense backward that writes dscores over scores
    ncl_kernels::ncl_loss_embeddings             streaming forward
    ncl_kernels::ncl_loss_embeddings_backward    streaming backward -> (dx, dy, dscale_sum)

The public functions in ``loss.py`` check metadata in (traced) Python; the checks that read
data (NaN/+inf scans, target ranges, masses, the scale's value, feasibility, overflow) run
here, inside the ops, so they never break a graph. The fakes only allocate outputs. The
math lives in ``_loss_math.py``.

Optional inputs travel as ``None`` and are resolved to their defaults inside the ops (the
default column mass needs ``sum(r)``). The forward returns the biases and LSE vectors,
which the backward needs; they are constants for the gradient (stop-gradient, as in the
method). ``scale`` travels as ``(scale_t, scale_f)``: a 0-dim tensor (read inside the op;
it gets a gradient) or, when ``scale_t`` is None, a Python number.
"""

from __future__ import annotations

import torch

from . import _library, _loss_math as LM, _validate as V
from ._dtypes import acc_dtype
from .backends import registry

Tensor = torch.Tensor

_PROBLEM = ("Tensor? scale_t, float scale_f, Tensor? row_targets, Tensor? col_targets, "
            "Tensor? row_mass, Tensor? col_mass, Tensor? f, Tensor? g, int n_iters, "
            "float w_row, float w_col")
_FORWARD = "(Tensor loss, Tensor f, Tensor g, Tensor lse_row, Tensor lse_col)"
_SOLVED = ("Tensor? scale_t, float scale_f, Tensor? row_targets, Tensor? col_targets, "
           "Tensor f, Tensor g, Tensor lse_row, Tensor lse_col, float w_row, float w_col")


def _fake_forward(like: Tensor, n: int, m: int):
    acc = acc_dtype(like.dtype)
    return (like.new_empty((), dtype=acc), like.new_empty(n, dtype=acc),
            like.new_empty(m, dtype=acc), like.new_empty(n, dtype=acc),
            like.new_empty(m, dtype=acc))


def _kernels(backend: str, like: Tensor, *primitives: str):
    return [registry.resolve(backend, p, like.device.type, like.dtype) for p in primitives]


def _finish(p: LM.LossProblem, b: LM.Biases, t_row, t_col, w_row, w_col, acc):
    LM.check_targets(b, p.y, p.z)
    coef_row, coef_col = LM.coefficients(p.y, p.z, w_row, w_col, acc)
    loss = LM.check_finite_loss(LM.assemble(b, t_row, t_col, p.y, p.z, coef_row, coef_col))
    return (loss,) + tuple(b)


def _coefficients(grad, like, n, m, row_targets, col_targets, w_row, w_col):
    """The backward's coefficient vectors, times the upstream gradient."""
    y, z = V.targets_values(row_targets, col_targets, n, m, like.device)
    coef_row, coef_col = LM.coefficients(y, z, w_row, w_col, acc_dtype(like.dtype))
    grad = grad.to(coef_row.dtype)
    return y, z, coef_row * grad, coef_col * grad


# -- dense form ---------------------------------------------------------------------------

def _dense_kernel(backend: str):
    def kernel(S, scale_t, scale_f, row_targets, col_targets, row_mass, col_mass, f, g,
               n_iters, w_row, w_col, inplace_backward, name="scores"):
        # inplace_backward is read only by the registered backward
        N, M = S.shape
        p = LM.loss_problem(S, N, M, scale_t, scale_f, row_targets, col_targets, row_mass,
                            col_mass, f, g)
        V.scores_values(S, name, scale=p.s)
        acc = acc_dtype(S.dtype)
        rows = torch.arange(N, device=S.device)
        cols = torch.arange(M, device=S.device)
        t_row = S[rows, p.y.clamp(min=0)].to(acc) * p.s
        t_col = S[p.z.clamp(min=0), cols].to(acc) * p.s
        V.targets_unmasked(t_row, t_col, p.y, p.z)
        row, col, step = _kernels(backend, S, "row_lse", "col_lse", "sinkhorn_step")
        b = LM.biases_and_lses(lambda g_: row(S, p.s, g_), lambda f_: col(S, p.s, f_),
                               lambda g_, log_r: step(S, p.s, g_, log_r), p.r, p.c, n_iters,
                               p.f, p.g)
        return _finish(p, b, t_row, t_col, w_row, w_col, acc)
    return kernel


def _gradient_fits(dtype: torch.dtype, s: float, coef_row: Tensor, coef_col: Tensor,
                   what: str) -> None:
    """``|s G_ij| <= s (|coef_row_i| + |coef_col_j|)``: refuse a low-precision gradient that
    this bound says could overflow its storage dtype (float16 above all: 65504)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return
    bound = s * (float(coef_row.abs().max()) + float(coef_col.abs().max()))
    limit = torch.finfo(dtype).max
    if bound > limit:
        raise ValueError(f"the {dtype} gradient of the loss with respect to {what} could "
                         f"overflow: scale ({s:g}) times the loss coefficients reaches "
                         f"{bound:.3g} > {limit:.3g}; use float32 or bfloat16 {what}, or a "
                         f"smaller scale")


def _dense_grad(backend, grad, S, scale_t, scale_f, row_targets, col_targets, f, g, lse_row,
                lse_col, w_row, w_col, out):
    s = V.scale_value(scale_t, scale_f)
    y, z, coef_row, coef_col = _coefficients(grad, S, S.shape[0], S.shape[1], row_targets,
                                             col_targets, w_row, w_col)
    if out is not None:
        _gradient_fits(out.dtype, s, coef_row, coef_col, "the scores")
    (kernel,) = _kernels(backend, S, "ncl_grad_")
    return kernel(S, s, f, g, lse_row, lse_col, coef_row, coef_col, y, z, out=out)


def _dense_backward_kernel(backend: str):
    def kernel(grad, S, scale_t, scale_f, row_targets, col_targets, f, g, lse_row, lse_col,
               w_row, w_col, need_scores):
        out = torch.empty(S.shape, dtype=S.dtype, device=S.device) if need_scores else None
        ds = _dense_grad(backend, grad, S, scale_t, scale_f, row_targets, col_targets, f, g,
                         lse_row, lse_col, w_row, w_col, out)
        return (S.new_empty(0) if out is None else out), ds
    return kernel


def _dense_backward_inplace_kernel(backend: str):
    def kernel(grad, S, scale_t, scale_f, row_targets, col_targets, f, g, lse_row, lse_col,
               w_row, w_col):
        # each element is read before it is written; returns sum G * S of the original S
        return _dense_grad(backend, grad, S, scale_t, scale_f, row_targets, col_targets, f, g,
                           lse_row, lse_col, w_row, w_col, S)
    return kernel


def _dense_backward_fake(grad, S, *rest):
    need_scores = rest[-1]
    dS = torch.empty_like(S, memory_format=torch.contiguous_format) if need_scores \
        else S.new_empty(0)
    return dS, S.new_empty((), dtype=acc_dtype(S.dtype))


def _dscale(ctx, index: int, ds: Tensor, scale_t) -> Tensor | None:
    return ds.to(scale_t.dtype) if ctx.needs_input_grad[index] else None


def _dense_setup(ctx, inputs, output):
    # (the name, last, may be left out by a direct caller: it has a default)
    (S, scale_t, scale_f, row_targets, col_targets, _r, _c, _f, _g, _n, w_row, w_col,
     inplace) = inputs[:13]
    _loss, f, g, lse_row, lse_col = output
    ctx.mark_non_differentiable(f, g, lse_row, lse_col)   # stop-gradient biases
    ctx.save_for_backward(S, scale_t, row_targets, col_targets, f, g, lse_row, lse_col)
    ctx.options = (scale_f, w_row, w_col, inplace)
    ctx.n_inputs = len(inputs)


_TWICE = ("ncl_loss(..., inplace_backward=True) has already written its gradient over the "
          "scores' storage, so its backward cannot run a second time (retain_graph=True, "
          "gradcheck, a second .backward()): pass inplace_backward=False (for NCLLoss: "
          "mode='streaming', or inplace_backward=False)")


def _dense_backward(backend: str):
    backward_op = _library.op("ncl_loss_backward", backend)
    backward_inplace_op = _library.op("ncl_loss_backward_", backend)

    def backward(ctx, grad, *_unused):
        scale_f, w_row, w_col, inplace = ctx.options
        try:
            S, scale_t, row_targets, col_targets, f, g, lse_row, lse_col = ctx.saved_tensors
        except RuntimeError as exc:  # the version check of a scores tensor already written
            if inplace:
                raise RuntimeError(_TWICE) from exc
            raise
        args = (scale_t, scale_f, row_targets, col_targets, f, g, lse_row, lse_col, w_row,
                w_col)
        need_S = ctx.needs_input_grad[0]
        if need_S and inplace:
            # the caller gave up S (documented): its storage becomes the gradient
            ds = backward_inplace_op(grad, S, *args)
            # a fresh alias of S, not S itself (which autograd and the caller still hold):
            # only a gradient nobody else references is stored as .grad without a copy
            dS = S.detach()
        else:
            dS, ds = backward_op(grad, S, *args, need_S)
            dS = dS if need_S else None
        return (dS, _dscale(ctx, 1, ds, scale_t)) + (None,) * (ctx.n_inputs - 2)
    return backward


_library.define("ncl_loss_backward",
                f"(Tensor grad, Tensor S, {_SOLVED}, bool need_scores) -> (Tensor, Tensor)",
                _dense_backward_kernel, _dense_backward_fake)
_library.define("ncl_loss_backward_", f"(Tensor grad, Tensor(a!) S, {_SOLVED}) -> Tensor",
                _dense_backward_inplace_kernel,
                lambda grad, S, *rest: S.new_empty((), dtype=acc_dtype(S.dtype)))
_library.define("ncl_loss",
                f'(Tensor S, {_PROBLEM}, bool inplace_backward, str name="scores") -> {_FORWARD}',
                _dense_kernel, lambda S, *rest: _fake_forward(S, S.shape[0], S.shape[1]),
                autograd=(_dense_backward, _dense_setup))


# -- streaming form -----------------------------------------------------------------------

def _xy_kernel(backend: str):
    def kernel(X, Y, scale_t, scale_f, row_targets, col_targets, row_mass, col_mass, f, g,
               n_iters, w_row, w_col, x_name="x", y_name="y"):
        N, M = X.shape[0], Y.shape[0]
        p = LM.loss_problem(X, N, M, scale_t, scale_f, row_targets, col_targets, row_mass,
                            col_mass, f, g)
        V.embeddings_values(X, Y, (x_name, y_name))
        acc = acc_dtype(X.dtype)
        row, col, step, targets = _kernels(backend, X, "row_lse_xy", "col_lse_xy",
                                           "sinkhorn_step_xy", "target_logits_xy")
        b = LM.biases_and_lses(lambda g_: row(X, Y, p.s, g_), lambda f_: col(X, Y, p.s, f_),
                               lambda g_, log_r: step(X, Y, p.s, g_, log_r), p.r, p.c,
                               n_iters, p.f, p.g)
        # target logits s * <x_i, y_{y_i}> and s * <x_{z_j}, y_j>, O((N + M) D), rounded as
        # the LSE passes round them (with one pair the two cancel exactly)
        t_row, t_col = targets(X, Y, p.s, p.y, p.z)
        return _finish(p, b, t_row, t_col, w_row, w_col, acc)
    return kernel


def _xy_backward_kernel(backend: str):
    def kernel(grad, X, Y, scale_t, scale_f, row_targets, col_targets, f, g, lse_row,
               lse_col, w_row, w_col, need_x, need_y, x_name="x", y_name="y"):
        s = V.scale_value(scale_t, scale_f)
        y, z, coef_row, coef_col = _coefficients(grad, X, X.shape[0], Y.shape[0],
                                                 row_targets, col_targets, w_row, w_col)
        (kernel,) = _kernels(backend, X, "ncl_grad_xy")
        dX, dY, ds = kernel(X, Y, s, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                            need_dx=need_x, need_dy=need_y)
        for grad_, name in ((dX, x_name), (dY, y_name)):
            if grad_ is not None and grad_.dtype == torch.float16:
                V.finite(f"the float16 gradient of {name}", grad_)
        return ((X.new_empty(0) if dX is None else dX), (Y.new_empty(0) if dY is None else dY),
                ds)
    return kernel


def _xy_backward_fake(grad, X, Y, scale_t, scale_f, row_targets, col_targets, f, g, lse_row,
                      lse_col, w_row, w_col, need_x, need_y, x_name="x", y_name="y"):
    dX = torch.empty_like(X, memory_format=torch.contiguous_format) if need_x \
        else X.new_empty(0)
    dY = torch.empty_like(Y, memory_format=torch.contiguous_format) if need_y \
        else Y.new_empty(0)
    return dX, dY, X.new_empty((), dtype=acc_dtype(X.dtype))


def _xy_setup(ctx, inputs, output):
    (X, Y, scale_t, scale_f, row_targets, col_targets, _r, _c, _f, _g, _n, w_row,
     w_col) = inputs[:13]
    ctx.names = tuple(inputs[13:15]) or ("x", "y")
    _loss, f, g, lse_row, lse_col = output
    ctx.mark_non_differentiable(f, g, lse_row, lse_col)   # stop-gradient biases
    ctx.save_for_backward(X, Y, scale_t, row_targets, col_targets, f, g, lse_row, lse_col)
    ctx.options = (scale_f, w_row, w_col)
    ctx.n_inputs = len(inputs)


def _xy_backward(backend: str):
    backward_op = _library.op("ncl_loss_embeddings_backward", backend)

    def backward(ctx, grad, *_unused):
        X, Y, scale_t, row_targets, col_targets, f, g, lse_row, lse_col = ctx.saved_tensors
        scale_f, w_row, w_col = ctx.options
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dX, dY, ds = backward_op(grad, X, Y, scale_t, scale_f, row_targets, col_targets, f, g,
                                 lse_row, lse_col, w_row, w_col, need_x, need_y, *ctx.names)
        return ((dX if need_x else None, dY if need_y else None,
                 _dscale(ctx, 2, ds, scale_t)) + (None,) * (ctx.n_inputs - 3))
    return backward


_library.define("ncl_loss_embeddings_backward",
                f"(Tensor grad, Tensor X, Tensor Y, {_SOLVED}, bool need_x, bool need_y, "
                'str x_name="x", str y_name="y") -> (Tensor, Tensor, Tensor)',
                _xy_backward_kernel, _xy_backward_fake)
_library.define("ncl_loss_embeddings",
                f'(Tensor X, Tensor Y, {_PROBLEM}, str x_name="x", str y_name="y") '
                f"-> {_FORWARD}",
                _xy_kernel, lambda X, Y, *rest: _fake_forward(X, X.shape[0], Y.shape[0]),
                autograd=(_xy_backward, _xy_setup))
