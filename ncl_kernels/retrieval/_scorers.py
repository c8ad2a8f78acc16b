"""Score blocks for retrieval: a (queries x gallery columns) block from embeddings.

A *scorer* turns a selection of gallery columns (a slice, or an index tensor) into the
block of scores of its queries against them, in the accumulation dtype (float32; float64
for float64 embeddings). The streaming loops in ``_stream`` only ever see scorers, so the
linear scores (``scale * <q, y> + bias``) and dual softmax share every loop, and the ranks
engine can ask for the positives' scores through exactly the same code as the blocks.
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype

Tensor = torch.Tensor


#: below this many queries the bias is added by ``addmm``; from it on, by an extra
#: embedding dimension (see LinearScorer)
AUGMENT_FROM = 16


class LinearScorer:
    """``scale * <q, y_j> + bias_j``: one BLAS call per block and nothing else.

    ``scale`` is folded into the queries once (one multiply per query element instead of
    one per score). The bias is folded into the product as one extra dimension,
    ``<[s q, 1], [y_j, b_j]>``, so no pass over the block is spent on it (``addmm`` would
    first copy the broadcast bias into the whole block); for a handful of queries the
    per-chunk copy that builds ``[y_j, b_j]`` would outweigh the block, so ``addmm`` is
    used there. The choice is made once, from all the queries, so every block and every
    pre-pass of one call rounds the same way.
    """

    def __init__(self, queries: Tensor, gallery: Tensor, scale: float, bias=None, *,
                 _state=None):
        self.Y = gallery
        self.scale = scale
        self.bias = bias
        if _state is not None:
            self.acc, self.Q, self.augment = _state
            return
        self.acc = acc_dtype(queries.dtype)
        Q = queries.to(self.acc) * scale
        self.augment = bias is not None and Q.shape[0] >= AUGMENT_FROM
        if self.augment:
            Q = torch.cat([Q, torch.ones(Q.shape[0], 1, dtype=self.acc, device=Q.device)], 1)
        self.Q = Q

    @property
    def n_queries(self) -> int:
        return self.Q.shape[0]

    @property
    def n_items(self) -> int:
        return self.Y.shape[0]

    def rows(self, index) -> LinearScorer:
        """The same scores for a subset of the queries (a slice: a view, no copy)."""
        return LinearScorer(None, self.Y, self.scale, self.bias,
                            _state=(self.acc, self.Q[index], self.augment))

    def __call__(self, cols, out=None) -> Tensor:
        Y = self.Y[cols].to(self.acc)   # a view for a float32 slice; a copy otherwise
        if self.bias is None:
            return torch.mm(self.Q, Y.T, out=out)
        if self.augment:
            # two plain copies into a fresh buffer (torch.cat with a 1-wide piece is slow)
            Ya = torch.empty(Y.shape[0], Y.shape[1] + 1, dtype=self.acc, device=Y.device)
            Ya[:, :-1] = Y
            Ya[:, -1] = self.bias[cols]
            return torch.mm(self.Q, Ya.T, out=out)
        return torch.addmm(self.bias[cols], self.Q, Y.T, out=out)


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
        return torch.mul(S, self.beta, out=out).sub_(self.lse[cols]).exp_().mul_(S)
