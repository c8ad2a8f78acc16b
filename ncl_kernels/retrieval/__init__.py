"""Retrieval at test time (docs/math.md section 4): gallery biases, ranks, top-k, metrics.

* :func:`gallery_bias` — NCL (Sinkhorn against a bank of training queries) or QB-Norm
  biases, streamed through the backend seam.
* :func:`ranks`, :func:`topk` — one pass over the gallery in chunks: memory
  O(queries * chunk), never O(queries * M); exact ties count against the query.
* :func:`metrics`, :func:`format_metrics`, :func:`evaluate` (none / ncl / qbnorm /
  qbnorm_dynamic / dsl).
* :func:`text_to_video_targets`, :func:`video_to_text_targets` — multi-caption layouts.
* :func:`to_faiss`, :func:`augment_queries` — serve with a Faiss inner-product index.
"""

from ._bias import BIAS_METHODS, gallery_bias
from ._captions import text_to_video_targets, video_to_text_targets
from ._evaluate import EVAL_METHODS, evaluate
from ._faiss import augment_queries, to_faiss
from ._metrics import RECALL_AT, format_metrics, metrics
from ._search import ranks, topk

__all__ = [
    "BIAS_METHODS",
    "EVAL_METHODS",
    "RECALL_AT",
    "augment_queries",
    "evaluate",
    "format_metrics",
    "gallery_bias",
    "metrics",
    "ranks",
    "text_to_video_targets",
    "to_faiss",
    "topk",
    "video_to_text_targets",
]
