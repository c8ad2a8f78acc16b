"""Serving with Faiss: the gallery bias folded into one extra dimension.

``scale * <q, y_j> + bias_j = <[q, 1], [scale * y_j, bias_j]>``, so an exact inner-product
index over the augmented gallery, searched with augmented queries, returns the items of
:func:`ncl_kernels.retrieval.topk` (up to float rounding: Faiss sums in its own order, so
items whose scores differ by a rounding error may swap).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _validate as V

Tensor = torch.Tensor


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("ncl_kernels.retrieval.to_faiss needs Faiss: pip install "
                          "'ncl_kernels[faiss]' (faiss-cpu) or a faiss-gpu build") from e
    return faiss


def _numpy32(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float32).numpy())


def to_faiss(gallery: Tensor, bias: Tensor | None = None, scale=1.0):
    """An exact inner-product Faiss index (``IndexFlatIP``, D + 1 dimensions) over
    ``[scale * y_j, bias_j]`` (``bias_j = 0`` when ``bias`` is None).

    Search it with :func:`augment_queries`. The bias must be finite: remove masked
    (``-inf``) items from the gallery instead. Vectors are stored as float32.
    """
    faiss = _faiss()
    Y, _ = V.embeddings(gallery, gallery, ("gallery", "gallery"))
    s = V.scale(scale)
    b = V.potential("bias", bias, Y.shape[0], Y)
    if b is not None and not bool(torch.isfinite(b).all()):
        raise ValueError("bias must be finite for Faiss (-inf items cannot be represented: "
                         "drop them from the gallery)")
    Ya = Y.to(torch.float64) * s
    extra = torch.zeros(Y.shape[0], 1, dtype=torch.float64, device=Y.device) if b is None \
        else b.to(torch.float64)[:, None]
    vectors = _numpy32(torch.cat([Ya, extra], 1))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def augment_queries(queries: Tensor) -> np.ndarray:
    """``[q, 1]`` as a float32 (Q, D + 1) numpy array, for ``index.search``."""
    Q, _ = V.embeddings(queries, queries, ("queries", "queries"))
    ones = torch.ones(Q.shape[0], 1, dtype=Q.dtype, device=Q.device)
    return _numpy32(torch.cat([Q, ones], 1))
