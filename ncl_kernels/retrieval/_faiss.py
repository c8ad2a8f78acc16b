"""Serving with Faiss: the gallery bias folded into one extra dimension.

``scale * <q, y_j> + bias_j = <[q, 1], [scale * y_j, bias_j]>``, so an inner-product
index over the augmented gallery, searched with augmented queries, ranks by exactly the
scores of :func:`ncl_kernels.retrieval.topk`: the metric is exact for every index family,
and only the index's own approximation (which lists IVF probes, which graph nodes HNSW
visits, how PQ or SQ codes round the vectors, the bias coordinate included) stands between
its answer and ``topk``'s. An exact index (``"Flat"``) returns ``topk``'s items up to float
rounding (Faiss sums in its own order, so items whose scores differ by a rounding error
may swap). docs/serving.md says how each family handles inner products.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .. import _validate as V
from .._types import Scale

if TYPE_CHECKING:
    import faiss

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


def _pad(x: Tensor, dim: Optional[int], name: str) -> Tensor:
    """``x`` with zero columns appended up to ``dim`` (zeros add nothing to a product)."""
    if dim is None or dim == x.shape[1]:
        return x
    dim = V.positive_int(name, dim)
    if dim < x.shape[1]:
        raise ValueError(f"{name} must be at least D + 1 = {x.shape[1]}; got {dim}")
    return torch.cat([x, x.new_zeros(x.shape[0], dim - x.shape[1])], 1)


def to_faiss(gallery: Tensor, bias: Optional[Tensor] = None, scale: Scale = 1.0, *,
             factory: str = "Flat", params: Optional[str] = None, dim: Optional[int] = None,
             train_size: Optional[int] = None, seed: int = 0) -> faiss.Index:
    """A Faiss inner-product index over ``[scale * y_j, bias_j]`` (``bias_j = 0`` when
    ``bias`` is None), built by ``faiss.index_factory(dim, factory,
    METRIC_INNER_PRODUCT)``, trained when it needs training, then filled.

    Search it with :func:`augment_queries` (``index.search(augment_queries(q, index.d),
    k)``): its scores are ``scale * <q, y_j> + bias_j``, the scores of
    :func:`ncl_kernels.retrieval.topk`.

    Args:
        gallery: (M, D) embeddings. The bias must be finite: remove masked (``-inf``)
            items from the gallery instead. Vectors are stored as float32.
        factory: any ``index_factory`` string: ``"Flat"`` (exact, the default),
            ``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF1024,PQ16"``, ``"OPQ16,IVF1024,PQ16"``,
            ``"IVF1024,SQ8"``... An index that does not rank by inner product is refused.
        params: search parameters for ``faiss.ParameterSpace().set_index_parameters``,
            e.g. ``"nprobe=32"`` (IVF) or ``"efSearch=128"`` (HNSW); settable later too.
        dim: the index's dimension, D + 1 by default; a larger one pads the vectors (and,
            through :func:`augment_queries` with ``index.d``, the queries) with zeros,
            e.g. for PQ, whose number of sub-quantizers must divide it.
        train_size: train on a random sample of this many gallery vectors (default: all;
            Faiss itself samples k-means down to 256 points per centroid).
        seed: the sample's seed.
    """
    faiss = _faiss()
    Y, _ = V.embeddings(gallery, gallery, ("gallery", "gallery"))
    s = V.scale(scale)
    b = V.potential("bias", bias, Y.shape[0], Y)
    if b is not None and not bool(torch.isfinite(b).all()):
        raise ValueError("bias must be finite for Faiss (-inf items cannot be represented: "
                         "drop them from the gallery)")
    if not isinstance(factory, str) or not factory:
        raise TypeError(f"factory must be a Faiss index_factory string; got {factory!r}")
    Ya = Y.to(torch.float64) * s
    extra = torch.zeros(Y.shape[0], 1, dtype=torch.float64, device=Y.device) if b is None \
        else b.to(torch.float64)[:, None]
    vectors = _numpy32(_pad(torch.cat([Ya, extra], 1), dim, "dim"))
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"factory={factory!r}: Faiss cannot build it for dimension "
                         f"{vectors.shape[1]} ({str(e).strip().splitlines()[-1]}); pass "
                         f"dim= to pad the vectors") from e
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"factory={factory!r} builds an index that does not rank by inner "
                         f"product (metric {index.metric_type}); its results would not be "
                         f"the biased scores")
    if not index.is_trained:
        sample = vectors
        if train_size is not None and V.positive_int("train_size", train_size) < len(vectors):
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(len(vectors), train_size, replace=False))]
        index.train(sample)
    index.add(vectors)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def augment_queries(queries: Tensor, dim: Optional[int] = None) -> np.ndarray:
    """``[q, 1]`` as a float32 (Q, D + 1) numpy array for ``index.search``; padded with
    zeros to ``dim`` columns for an index built with a larger ``dim`` (pass ``index.d``)."""
    Q, _ = V.embeddings(queries, queries, ("queries", "queries"))
    ones = torch.ones(Q.shape[0], 1, dtype=Q.dtype, device=Q.device)
    return _numpy32(_pad(torch.cat([Q, ones], 1), dim, "dim"))
