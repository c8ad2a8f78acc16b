"""python_ref — the float64 oracle of ncl_kernels (see docs/math.md).

Naive on purpose: dense matrices, ``torch.logsumexp``, no chunking, every function in
``dtype`` (default float64). Names mirror the public API so every fast path can be checked
against it; tests and benchmarks import this one copy.
"""

from .loss import (
    apply_biases,
    default_targets,
    ncl_grad,
    ncl_loss,
    ncl_loss_all_positives,
    ncl_loss_embeddings,
    ncl_loss_own_bias,
)
from .retrieval import (
    dual_softmax_scores,
    gallery_bias,
    metrics,
    qbnorm_dynamic_scores,
    ranks,
    scores,
    text_to_video_targets,
    video_to_text_targets,
)
from .sinkhorn import (
    SinkhornRef,
    col_lse,
    masses,
    row_lse,
    sinkhorn,
    sinkhorn_embeddings,
    sinkhorn_error,
)

__all__ = [
    "masses",
    "row_lse",
    "col_lse",
    "SinkhornRef",
    "sinkhorn",
    "sinkhorn_embeddings",
    "sinkhorn_error",
    "default_targets",
    "ncl_loss",
    "ncl_loss_embeddings",
    "ncl_grad",
    "ncl_loss_all_positives",
    "ncl_loss_own_bias",
    "apply_biases",
    "gallery_bias",
    "scores",
    "qbnorm_dynamic_scores",
    "dual_softmax_scores",
    "ranks",
    "metrics",
    "text_to_video_targets",
    "video_to_text_targets",
]
