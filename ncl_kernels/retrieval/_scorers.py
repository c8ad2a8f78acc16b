"""Score blocks for retrieval: a (queries x gallery columns) block from embeddings.

A *scorer* turns a selection of gallery columns (a slice, or an index tensor) into the
block of scores of its queries against them, in the accumulation dtype (float32; float64
for float64 embeddings). The streaming loops in ``_stream`` only ever see scorers, so the
linear scores (``scale * <q, y> + bias``) and dual softmax share every loop, and the ranks
engine can ask for the positives' scores through exactly the same code as the blocks.
"""

from __future__ import annotations

import torch

from ..backends.base import acc_dtype

Tensor = torch.Tensor


def _mm(a: Tensor, b: Tensor, bias, out) -> Tensor:
    if bias is None:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b) if out is None else torch.addmm(bias, a, b, out=out)


class LinearScorer:
    """``scale * <q, y_j> + bias_j``: one ``addmm`` per block.

    ``scale`` is folded into the queries once (one multiply per query element instead of
    one per score), and the bias rides along in the ``addmm``, so a block costs one BLAS
    call and nothing else.
    """

    def __init__(self, queries: Tensor, gallery: Tensor, scale: float, bias=None, *,
                 _prescaled: bool = False):
        self.acc = acc_dtype(queries.dtype)
        self.Q = queries if _prescaled else queries.to(self.acc) * scale
        self.Y = gallery
        self.scale = scale
        self.bias = bias

    @property
    def n_queries(self) -> int:
        return self.Q.shape[0]

    @property
    def n_items(self) -> int:
        return self.Y.shape[0]

    def rows(self, index) -> LinearScorer:
        """The same scores for a subset of the queries (a slice: a view, no copy)."""
        return LinearScorer(self.Q[index], self.Y, self.scale, self.bias, _prescaled=True)

    def __call__(self, cols, out=None) -> Tensor:
        Y = self.Y[cols].to(self.acc)   # a view for a float32 slice; a copy otherwise
        bias = None if self.bias is None else self.bias[cols]
        return _mm(self.Q, Y.T, bias, out)


class DualSoftmaxScorer:
    """Dual softmax: ``S_ij * exp(beta * S_ij - lse_j)`` with ``S = Q @ Y.T`` (raw) and
    ``lse_j = LSE_i(beta * S_ij)`` over *all* test queries, computed by the caller."""

    def __init__(self, queries: Tensor, gallery: Tensor, beta: float, lse: Tensor):
        self.acc = acc_dtype(queries.dtype)
        self.Q = queries.to(self.acc)
        self.Y = gallery
        self.beta = beta
        self.lse = lse

    @property
    def n_queries(self) -> int:
        return self.Q.shape[0]

    @property
    def n_items(self) -> int:
        return self.Y.shape[0]

    def rows(self, index) -> DualSoftmaxScorer:
        return DualSoftmaxScorer(self.Q[index], self.Y, self.beta, self.lse)

    def __call__(self, cols, out=None) -> Tensor:
        S = torch.mm(self.Q, self.Y[cols].to(self.acc).T)
        block = torch.mul(S, self.beta) if out is None else torch.mul(S, self.beta, out=out)
        return block.sub_(self.lse[cols]).exp_().mul_(S)
