"""``evaluate``: ranks and metrics under one gallery normalization (docs/math.md section 4)."""

from __future__ import annotations

import torch

from .. import _library, _validate as V
from .._types import Scale
from ..backends import registry
from . import _stream
from ._bias import bias_of_checked
from ._metrics import metrics
from ._scorers import DualSoftmaxScorer, LinearScorer

Tensor = torch.Tensor
EVAL_METHODS = ("none", "ncl", "qbnorm", "qbnorm_dynamic", "dsl")
NEEDS_BANK = ("ncl", "qbnorm", "qbnorm_dynamic")


def evaluate(queries: Tensor, gallery: Tensor, targets: Tensor, scale: Scale = 1.0, *,
             method: str = "none", bank: Tensor | None = None, beta: Scale | None = None,
             n_iters: int = 100, tol: float | None = 1e-4,
             chunk: int | None = None, backend: str = "auto") -> dict[str, float]:
    """Retrieval metrics (:func:`metrics`) of ``queries`` against ``gallery``.

    ``method``:

    * ``"none"``: rank by ``<q, y_j>``.
    * ``"ncl"``: rank by ``scale * <q, y_j> + g_j`` with ``g = gallery_bias(bank, gallery,
      scale, method="ncl")`` (``n_iters``, ``tol``): uses only the bank.
    * ``"qbnorm"``: QB-Norm inverted softmax, ``beta * <q, y_j> - LSE_b(beta * <b, y_j>)``:
      uses only the bank.
    * ``"qbnorm_dynamic"``: QB-Norm's dynamic inverted softmax: the IS score for a query
      whose top-1 item (by ``<q, y_j>``, ties to the lowest index) is in the activation set
      ``{argmax_j <b, y_j> : b in bank}``, the raw score ``<q, y_j>`` otherwise; uses only
      the bank.
    * ``"dsl"``: dual softmax, ``S_ij * softmax_i(beta * S_ij)`` with ``S = Q @ Y.T`` and the
      softmax over **all the test queries at once** (each item's column is normalized over
      the test set: this is transductive, unlike the bank methods; ``bank`` is ignored).

    ``beta`` (the QB-Norm / dual-softmax inverse temperature) defaults to ``scale``.
    ``targets`` as in :func:`ranks` ((Q,) or (Q, P) padded with -1). Every pass streams over
    the gallery in chunks (:func:`ranks`); the bank passes go through the backend seam.
    Each input is scanned for NaN and inf once.
    """
    V.choice("method", method, EVAL_METHODS)
    Q, Y = V.embeddings(queries, gallery, ("queries", "gallery"))
    s = V.scale(scale)
    b = s if beta is None else V.scale(beta)
    _library.check_backend(backend, Q.device)
    if method in NEEDS_BANK:
        if bank is None:
            raise ValueError(f"method={method!r} needs a bank of training queries (bank=...)")
        V.embeddings_meta(bank, Y, ("bank", "gallery"))
        V.finite("bank", bank)
    if chunk is not None:
        chunk = V.positive_int("chunk", chunk)
    T = V.retrieval_targets(targets, Q.shape[0], Y.shape[0], Q.device)
    chunk_q = _stream.default_chunk(Q.shape[0], Y.shape[0], chunk, Q.device)
    with torch.no_grad():
        if method == "none":
            r, _ = _stream.rank_one_pass(LinearScorer(Q, Y, 1.0), T, chunk_q)
        elif method in ("ncl", "qbnorm"):
            s_rank = s if method == "ncl" else b
            bias = bias_of_checked(method, bank, Y, s_rank, n_iters, tol, backend)
            r, _ = _stream.rank_one_pass(LinearScorer(Q, Y, s_rank, bias), T, chunk_q)
        elif method == "qbnorm_dynamic":
            r = _dynamic_ranks(Q, Y, T, bank, b, chunk, backend)
        else:
            lse = registry.resolve(backend, "col_lse_xy", Q.device.type, Q.dtype)(Q, Y, b, None)
            r, _ = _stream.rank_one_pass(DualSoftmaxScorer(Q, Y, b, lse), T, chunk_q)
    return metrics(r)


def _dynamic_ranks(Q, Y, T, bank, beta, chunk, backend) -> Tensor:
    M = Y.shape[0]
    bank_top = _stream.argmax(LinearScorer(bank, Y, 1.0),
                              _stream.default_chunk(bank.shape[0], M, chunk, Y.device))
    active = torch.zeros(M, dtype=torch.bool, device=Y.device)
    active[bank_top] = True
    query_top = _stream.argmax(LinearScorer(Q, Y, 1.0),
                               _stream.default_chunk(Q.shape[0], M, chunk, Y.device))
    use_is = active[query_top]
    bias = bias_of_checked("qbnorm", bank, Y, beta, 0, None, backend)
    r = torch.empty(Q.shape[0], dtype=torch.int64, device=Q.device)
    for rows, scorer in ((use_is, LinearScorer(Q[use_is], Y, beta, bias)),
                         (~use_is, LinearScorer(Q[~use_is], Y, 1.0))):
        if scorer.n_queries:
            r[rows], _ = _stream.rank_one_pass(
                scorer, T[rows], _stream.default_chunk(scorer.n_queries, M, chunk, Y.device))
    return r
