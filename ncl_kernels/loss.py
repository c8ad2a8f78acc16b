"""The NCL loss (docs/math.md section 3): forward from LSE passes, backward in one pass.

The public entries check metadata here and call the ops of ``_loss_ops`` (which check
the data, solve the biases, assemble the loss, and carry the registered backward), so
``torch.compile(fullgraph=True)`` traces them without graph breaks. The dense and the
embedding forms share the bias solve, the loss assembly and the coefficients; they differ
only in which primitives read the scores. Biases are constants for the gradient
(stop-gradient), as in the method.
"""

from __future__ import annotations

import torch

from . import _library, _loss_ops, _materialize as M_, _validate as V  # noqa: F401
from ._dtypes import acc_dtype
from ._types import OptTensor, Scale, Weights

Tensor = torch.Tensor


def _loss_options(like: Tensor, n: int, m: int, scale, row_targets, col_targets, n_iters,
                  f, g, weights, row_mass, col_mass, backend):
    """The metadata checks, in traced Python; the op runs the data checks (_loss_ops)."""
    _library.check_backend(backend, like.device)
    scale_t, scale_f = V.scale_meta(scale, like)
    V.iterations(n_iters, None, 1)
    y, z = V.targets_meta(row_targets, col_targets, n, m, like)
    if (f is None) != (g is None):
        raise ValueError("pass both f and g (precomputed biases) or neither (solve them)")
    f = V.potential_meta("f", f, n, like)
    g = V.potential_meta("g", g, m, like)
    w_row, w_col = V.weights(weights)
    r, c = V.masses_meta(row_mass, col_mass, n, m, like)
    # biases are constants for the gradient
    f = None if f is None else f.detach()
    g = None if g is None else g.detach()
    return (scale_t, scale_f, y, z, r, c, f, g, n_iters, w_row, w_col)



def ncl_loss(scores: Tensor, scale: Scale = 1.0, *, row_targets: OptTensor = None,
             col_targets: OptTensor = None, n_iters: int = 4, f: OptTensor = None,
             g: OptTensor = None, weights: Weights = (0.5, 0.5), row_mass: OptTensor = None,
             col_mass: OptTensor = None, inplace_backward: bool = False,
             backend: str = "auto") -> Tensor:
    """NCL loss on the logits ``scale * scores`` (docs/math.md section 3), differentiable.

    Args:
        scores: (N, M) similarity matrix (float32/float64/bfloat16/float16, unit column
            stride). Gradients flow to it and to ``scale`` when that is a tensor requiring
            grad.
        row_targets, col_targets: int64 (N,) in ``[0, M)`` and (M,) in ``[0, N)``; ``-1``
            means no loss term for that row/column. Default: the diagonal of the leading
            square block, so extra rows/columns (a queue) are negatives only.
        n_iters: Sinkhorn iterations for the biases (``tol=None``: no host sync per
            iteration); 0 gives CLIP's symmetric InfoNCE.
        f, g: precomputed biases (both or neither); they are constants for the gradient.
        weights: ``(w_row, w_col)``; the mean over an empty target set counts as 0.
        row_mass, col_mass: masses for the bias solve (defaults as in :func:`sinkhorn`).
        inplace_backward: the backward writes ``dloss/dscores`` over the storage of
            ``scores`` (after using it for ``dloss/dscale``) and hands that storage to
            autograd as the gradient: no N x M buffer is allocated, and the caller gives up
            ``scores``. Default False: a new buffer; ``scores`` is never written. Refused
            for scores whose elements overlap in memory and for views of a leaf that
            requires grad; a second backward through the step raises (the scores are gone).
            float16 scores: the gradient must fit float16 (``scale * (max coef_row +
            max coef_col) <= 65504``, docs/math.md section 5), else the backward raises.
        backend: see :func:`ncl_kernels.backends`.

    Returns:
        0-dim float32 tensor (float64 for float64 scores).
    """
    S = V.scores_meta(scores)
    inplace = V.flag("inplace_backward", inplace_backward)
    if inplace:
        V.writable(S)
        if not torch.compiler.is_compiling():  # (views are not tracked while tracing)
            V.not_a_leaf_view(S)
    N, M = S.shape
    options = _loss_options(S, N, M, scale, row_targets, col_targets, n_iters, f, g, weights,
                            row_mass, col_mass, backend)
    return _library.op("ncl_loss", backend)(S, *options, inplace, "scores")[0]


def ncl_loss_embeddings(x: Tensor, y: Tensor, scale: Scale = 1.0, *,
                        row_targets: OptTensor = None, col_targets: OptTensor = None,
                        n_iters: int = 4, f: OptTensor = None, g: OptTensor = None,
                        weights: Weights = (0.5, 0.5), row_mass: OptTensor = None,
                        col_mass: OptTensor = None,
                        backend: str = "auto", materialize: bool | None = None,
                        memory_budget: int | None = None) -> Tensor:
    """:func:`ncl_loss` on ``scores = x @ y.T``, streamed or formed once.

    Streaming (forward and backward over tiles or chunks of rows; the backward recomputes
    each one) keeps memory O((N + M) * D + chunk). Forming S once in float32 (then the dense
    loss, its gradient written over S) is faster where it fits: ``materialize=None``
    decides by the cost model of ``ncl_kernels/_materialize.py`` under ``memory_budget``
    bytes (default 256 MiB), ``True`` forms S whatever its size, ``False`` always streams.
    Gradients flow to ``x``, ``y`` and a tensor ``scale``. The other options are those of
    :func:`ncl_loss`.
    """
    return embeddings_loss(x, y, scale, ("x", "y"), row_targets=row_targets,
                           col_targets=col_targets, n_iters=n_iters, f=f, g=g,
                           weights=weights, row_mass=row_mass, col_mass=col_mass,
                           backend=backend, materialize=materialize,
                           memory_budget=memory_budget)


def embeddings_loss(x, y, scale, names, *, row_targets, col_targets, n_iters, f, g, weights,
                    row_mass, col_mass, backend, materialize, memory_budget) -> Tensor:
    """:func:`ncl_loss_embeddings` with the caller's names for ``x`` and ``y``."""
    X, Y = V.embeddings_meta(x, y, names)
    N, M = X.shape[0], Y.shape[0]
    options = _loss_options(X, N, M, scale, row_targets, col_targets, n_iters, f, g, weights,
                            row_mass, col_mass, backend)
    if M_.choose(materialize, memory_budget, X, Y, passes=2 * n_iters + 1, backward=True):
        S = M_.checked_product(X, Y, names)
        return _library.op("ncl_loss", backend)(S, *options, True,
                                                f"{names[0]} @ {names[1]}.T")[0]
    return _library.op("ncl_loss_embeddings", backend)(X, Y, *options, *names)[0]


def apply_biases_(scores: Tensor, scale: Scale = 1.0, f: OptTensor = None,
                  g: OptTensor = None, *, backend: str = "auto") -> Tensor:
    """In place ``scores <- scale * scores + f[:, None] + g[None, :]``; returns ``scores``.

    The arithmetic runs in float32 (float64 for float64) and is rounded once to the storage
    dtype. Not differentiable: a tensor that requires grad is refused. Refused too, before
    anything is written: scores whose elements overlap in memory (an expanded tensor), and
    results beyond the storage dtype's range (``+inf``; results below its range become
    ``-inf``, a mask, only where ``scores`` already holds masks). ``f`` or ``g`` sharing
    memory with ``scores`` are read as they were before the write. On any error the
    caller's tensor is left untouched.
    """
    S = V.writable(V.scores_meta(scores))
    if S.requires_grad:
        raise ValueError("apply_biases_ is an in-place, non-differentiable update; pass a "
                         "tensor that does not require grad (e.g. scores.detach())")
    N, M = S.shape
    s = V.scale_value(*V.scale_meta(scale, S))
    acc = acc_dtype(S.dtype)
    f = V.unaliased(V.potential_values("f", V.potential_meta("f", f, N, S), acc), S)
    g = V.unaliased(V.potential_values("g", V.potential_meta("g", g, M, S), acc), S)
    V.biased_scores_fit(S, s, f, g)
    _library.check_backend(backend, S.device)
    with torch.no_grad():
        _library.op("apply_biases_", backend)(S, s, f, g)
    return S
