"""Gallery biases from a bank of training queries (SPEC.md section 4)."""

from __future__ import annotations

import torch

from .. import _validate as V
from ..backends import get as get_backend
from ..sinkhorn import sinkhorn_embeddings

Tensor = torch.Tensor
BIAS_METHODS = ("ncl", "qbnorm")


def gallery_bias(bank: Tensor, gallery: Tensor, scale=1.0, *, method: str = "ncl",
                 n_iters: int = 100, tol: float | None = 1e-4,
                 backend: str = "auto") -> Tensor:
    """The (M,) bias to add to ``scale * <q, y_j>`` when ranking the gallery.

    ``method="ncl"``: ``g`` of Sinkhorn on ``scale * bank @ gallery.T`` with ``r = 1``,
    ``c = K / M`` (SPEC.md section 4), through :func:`ncl_kernels.sinkhorn_embeddings`:
    the backend's streaming primitives, never K x M in memory. ``method="qbnorm"``:
    QB-Norm's inverted softmax ``-LSE_b(scale * <b, y_j>)`` (``scale`` plays QB-Norm's
    beta), one streaming column pass. ``n_iters``/``tol`` apply to ``"ncl"`` only.
    Video-to-text: call it with the roles swapped.

    Returns:
        (M,) float32 (float64 for float64 embeddings) on the gallery's device.
    """
    V.choice("method", method, BIAS_METHODS)
    B, Y = V.embeddings(bank, gallery, ("bank", "gallery"))
    if method == "ncl":
        return sinkhorn_embeddings(B, Y, scale, n_iters=n_iters, tol=tol, backend=backend).g
    s = V.scale(scale)
    be = get_backend(backend, B.device)
    with torch.no_grad():
        return -be.col_lse_xy(B, Y, s, None)
