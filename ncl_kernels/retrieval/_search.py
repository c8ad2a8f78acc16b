"""Public streaming ``ranks`` and ``topk`` over linear scores ``scale * <q, y_j> + bias_j``."""

from __future__ import annotations

import torch

from .. import _validate as V
from .._types import Scale
from . import _stream
from ._scorers import LinearScorer

Tensor = torch.Tensor


def linear_scorer(queries, gallery, scale, bias, chunk):
    """Validate the shared arguments; returns ``(scorer, chunk)``."""
    Q, Y = V.embeddings(queries, gallery, ("queries", "gallery"))
    s = V.scale(scale)
    bias = V.potential("bias", bias, Y.shape[0], Y)
    if chunk is not None:
        chunk = V.positive_int("chunk", chunk)
    return LinearScorer(Q, Y, s, bias), _stream.default_chunk(Q.shape[0], Y.shape[0], chunk,
                                                                     Q.device)


def ranks(queries: Tensor, gallery: Tensor, targets: Tensor, scale: Scale = 1.0, *,
          bias: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """Rank of each query's positive: ``1 + #{j != t : score_j >= score_t}`` (docs/math.md 4).

    Scores are ``scale * <q, y_j> + bias_j``, formed in float32 (float64 for float64
    embeddings); a tie counts against the query and is an exact (bitwise) comparison of
    the scores as computed. One pass over the gallery in chunks of ``chunk`` columns
    (default: a 16 MiB score block); memory O(queries * chunk), never O(queries * M).

    Args:
        queries: (Q, D) embeddings; gallery: (M, D), same dtype and device.
        targets: (Q,) int64 gallery indices, or (Q, P) padded with -1 for several
            positives (the rank is the best among them; each row needs one).
        scale: ``s > 0``; bias: optional (M,) per-item bias (``-inf`` removes an item:
            it ranks below everything, and a removed positive gets rank M).
        chunk: gallery columns per block.

    Returns:
        (Q,) int64 ranks on the queries' device, 1 = the positive is first.
    """
    scorer, chunk = linear_scorer(queries, gallery, scale, bias, chunk)
    T = V.retrieval_targets(targets, scorer.n_queries, scorer.n_items, scorer.Q.device)
    with torch.no_grad():
        return _stream.rank_one_pass(scorer, T, chunk)[0]


def topk(queries: Tensor, gallery: Tensor, k: int, scale: Scale = 1.0, *,
         bias: Tensor | None = None, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` best gallery items per query: ``(values, indices)``, sorted descending
    like ``torch.topk`` (values in float32; float64 for float64 embeddings).

    Streams over gallery chunks, merging each chunk's top-k into the running top-k;
    memory O(queries * (chunk + k)). Equal values may come in either order.
    """
    scorer, chunk = linear_scorer(queries, gallery, scale, bias, chunk)
    k = V.topk_k(k, scorer.n_items)
    with torch.no_grad():
        return _stream.topk(scorer, k, chunk)
