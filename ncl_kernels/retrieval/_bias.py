"""Gallery biases from a bank of training queries (docs/math.md section 4)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _library, _validate as V
from .._dtypes import acc_dtype
from .._types import Scale
from ..backends import registry
from ..sinkhorn import Problem, converged, embeddings_solution, run_embeddings

Tensor = torch.Tensor
BIAS_METHODS = ("ncl", "qbnorm")


def qbnorm(backend: str, bank: Tensor, gallery: Tensor, s: float) -> Tensor:
    """QB-Norm's inverted-softmax bias ``-LSE_b(s * <b, y_j>)`` on checked embeddings."""
    col = registry.resolve(backend, "col_lse_xy", bank.device.type, bank.dtype)
    bias = -col(bank, gallery, s, None)
    if not bool(torch.isfinite(bias).all()):  # finite embeddings: only an overflow does it
        raise ValueError(f"the QB-Norm bias is not finite: scale * <bank, gallery> ({s:g} "
                         f"times the products) overflows {bias.dtype}; lower the scale or "
                         f"normalize the embeddings")
    return bias


def _qbnorm_kernel(backend: str):
    def kernel(bank, gallery, scale_t, scale_f):
        s = V.scale_value(scale_t, scale_f)
        V.embeddings_values(bank, gallery, ("bank", "gallery"))
        return qbnorm(backend, bank, gallery, s)
    return kernel


_library.define("qbnorm_bias", "(Tensor bank, Tensor gallery, Tensor? scale_t, float scale_f) "
                "-> Tensor", _qbnorm_kernel,
                lambda bank, gallery, scale_t, scale_f: gallery.new_empty(
                    gallery.shape[0], dtype=acc_dtype(gallery.dtype)))


def bias_of_checked(method: str, bank: Tensor, gallery: Tensor, s: float, n_iters: int,
                    tol: Optional[float], backend: str) -> Tensor:
    """:func:`gallery_bias` on embeddings the caller has checked (no second NaN scan)."""
    if method == "qbnorm":
        return qbnorm(backend, bank, gallery, s)
    K, M = bank.shape[0], gallery.shape[0]
    r, c = V.masses_values(None, None, K, M, bank)
    sol = run_embeddings(backend, bank, gallery, Problem(s, r, c, None), n_iters, tol,
                         check_every=10)
    converged(sol.n_iters, sol.error, n_iters, tol, strict=False, stacklevel=4)
    return sol.g


def gallery_bias(bank: Tensor, gallery: Tensor, scale: Scale = 1.0, *, method: str = "ncl",
                 n_iters: int = 100, tol: float | None = 1e-4, backend: str = "auto",
                 materialize: bool | None = None,
                 memory_budget: int | None = None) -> Tensor:
    """The (M,) bias to add to ``scale * <q, y_j>`` when ranking the gallery.

    ``method="ncl"``: ``g`` of Sinkhorn on ``scale * bank @ gallery.T`` with ``r = 1``,
    ``c = K / M`` (docs/math.md section 4), through
    :func:`ncl_kernels.sinkhorn_embeddings`: the backend's streaming primitives, never
    K x M in memory. ``method="qbnorm"``: QB-Norm's inverted softmax
    ``-LSE_b(scale * <b, y_j>)`` (``scale`` plays QB-Norm's beta), one streaming column
    pass. ``n_iters``, ``tol``, ``materialize`` and ``memory_budget`` (as in
    :func:`ncl_kernels.sinkhorn_embeddings`) apply to ``"ncl"`` only. Video-to-text: call
    it with the roles swapped. With ``tol=None`` (or ``method="qbnorm"``) it compiles with
    ``torch.compile(fullgraph=True)``.

    Returns:
        (M,) float32 (float64 for float64 embeddings) on the gallery's device.
    """
    V.choice("method", method, BIAS_METHODS)
    B, Y = V.embeddings_meta(bank, gallery, ("bank", "gallery"))
    if method == "ncl":
        return embeddings_solution(B, Y, scale, ("bank", "gallery"), row_mass=None,
                                   col_mass=None, n_iters=n_iters, tol=tol, check_every=10,
                                   init_g=None, backend=backend, strict=False,
                                   materialize=materialize, memory_budget=memory_budget).g
    scale_t, scale_f = V.scale_meta(scale, B)
    _library.check_backend(backend, B.device)
    return _library.op("qbnorm_bias", backend)(
        B.detach(), Y.detach(), None if scale_t is None else scale_t.detach(), scale_f)
