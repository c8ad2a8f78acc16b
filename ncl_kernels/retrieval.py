"""Retrieval at test time (SPEC.md section 4): gallery biases, ranks, top-k, metrics.

Scores are ``scale * <q, y_j> + bias_j``, formed in float32 (float64 for float64
embeddings). ``ranks`` and ``topk`` stream over chunks of the gallery: memory is
O(queries * chunk), never O(queries * M).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from . import _validate as V
from .backends import get as get_backend
from .backends.base import acc_dtype
from .sinkhorn import sinkhorn_embeddings

Tensor = torch.Tensor
METHODS = ("ncl", "qbnorm")
RECALL_AT = (1, 5, 10, 50)
#: elements of one (queries x gallery chunk) score block when ``chunk`` is not given
BLOCK_ELEMS = 1 << 24


def gallery_bias(bank: Tensor, gallery: Tensor, scale=1.0, *, method: str = "ncl",
                 n_iters: int = 100, tol: Optional[float] = 1e-4,
                 backend: str = "auto") -> Tensor:
    """The (M,) bias to add to ``scale * <q, y_j>`` when ranking the gallery.

    ``method="ncl"``: ``g`` of Sinkhorn on ``scale * bank @ gallery.T`` with ``r = 1``,
    ``c = K / M`` (streamed, never K x M in memory). ``method="qbnorm"``: QB-Norm's
    inverted softmax, ``-LSE_b(scale * <b, y_j>)`` (``scale`` plays QB-Norm's beta).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    B, Y = V.embeddings(bank, gallery)
    if method == "ncl":
        return sinkhorn_embeddings(B, Y, scale, n_iters=n_iters, tol=tol, backend=backend).g
    s = V.scale(scale)
    be = get_backend(backend, B.device)
    with torch.no_grad():
        return -be.col_lse_xy(B, Y, s, None)


def _query_setup(queries, gallery, scale, bias, chunk):
    Q, Y = V.embeddings(queries, gallery)
    s = V.scale(scale)
    acc = acc_dtype(Q.dtype)
    M = Y.shape[0]
    if bias is not None:
        bias = V.potential("bias", bias, M, Y)
    if chunk is None:
        chunk = max(1, BLOCK_ELEMS // Q.shape[0])
    elif not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    return Q.to(acc), Y, s, bias, chunk


def _block(Qa: Tensor, Y: Tensor, start: int, stop: int, s: float, bias) -> Tensor:
    block = (Qa @ Y[start:stop].to(Qa.dtype).T) * s
    if bias is not None:
        block += bias[start:stop]
    return block


def ranks(queries: Tensor, gallery: Tensor, targets: Tensor, scale=1.0, *,
          bias: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tensor:
    """Rank of each query's positive: ``1 + #{j != t : score_j >= score_t}``.

    A tie counts against the query. ``targets`` is (Q,) or (Q, P) padded with -1 for
    several positives (the rank is the best among them; each row needs at least one).
    Ties are exact comparisons of float32 scores (float64 for float64 embeddings).

    Returns:
        (Q,) int64 ranks, 1 = the positive is first.
    """
    Qa, Y, s, bias, chunk = _query_setup(queries, gallery, scale, bias, chunk)
    n_q, M = Qa.shape[0], Y.shape[0]
    T = _targets(targets, n_q, M, Qa.device)
    Tc = T.clamp(min=0)
    spans = [(start, min(M, start + chunk)) for start in range(0, M, chunk)]
    with torch.no_grad():
        # Pass 1 reads each positive's score out of the very block the counting pass
        # computes, so a tie is a bitwise tie (a separate dot product could round
        # differently from the matmul and break or invent ties).
        pos = torch.empty(T.shape, dtype=Qa.dtype, device=Qa.device)
        for start, stop in spans:
            block = _block(Qa, Y, start, stop, s, bias)
            inside = (Tc >= start) & (Tc < stop)
            at = block.gather(1, (Tc - start).clamp(0, stop - start - 1))
            pos = torch.where(inside, at, pos)
        count = torch.zeros(T.shape, dtype=torch.int64, device=Qa.device)
        for start, stop in spans:
            block = _block(Qa, Y, start, stop, s, bias)
            for p in range(T.shape[1]):
                count[:, p] += (block >= pos[:, p:p + 1]).sum(1)
        # every positive counted itself once (score >= own score): 1 + count - 1
    big = torch.iinfo(torch.int64).max
    return count.masked_fill(T < 0, big).min(1).values


def _targets(targets, n_q: int, M: int, device) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor; got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    T = targets.to(device)
    if T.dim() == 1:
        T = T[:, None]
    if T.dim() != 2 or T.shape[0] != n_q or T.shape[1] == 0:
        raise ValueError(f"targets must have shape ({n_q},) or ({n_q}, P); got "
                         f"{tuple(targets.shape)}")
    if bool(((T < -1) | (T >= M)).any()):
        raise ValueError(f"targets must be gallery indices in [0, {M}) or -1 (padding)")
    if bool((T < 0).all(1).any()):
        raise ValueError("every query needs at least one target that is not -1")
    return T


def topk(queries: Tensor, gallery: Tensor, k: int, scale=1.0, *,
         bias: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` best gallery items per query: ``(values, indices)``, sorted descending.

    Streams over gallery chunks, merging each chunk's top-k into the running top-k.
    """
    Qa, Y, s, bias, chunk = _query_setup(queries, gallery, scale, bias, chunk)
    M = Y.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= M:
        raise ValueError(f"k must be an integer in [1, {M}] (the gallery size); got {k!r}")
    best_v = torch.empty(Qa.shape[0], 0, dtype=Qa.dtype, device=Qa.device)
    best_i = torch.empty(Qa.shape[0], 0, dtype=torch.int64, device=Qa.device)
    with torch.no_grad():
        for start in range(0, M, chunk):
            stop = min(M, start + chunk)
            v, i = _block(Qa, Y, start, stop, s, bias).topk(min(k, stop - start), dim=1)
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1)
            best_v, order = v.topk(min(k, v.shape[1]), dim=1)
            best_i = i.gather(1, order)
    return best_v, best_i


def metrics(ranks: Tensor) -> Dict[str, float]:
    """``R@1, R@5, R@10, R@50`` (percent), ``MdR`` (numpy median) and ``MnR``."""
    if not isinstance(ranks, Tensor) or ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError("ranks must be a non-empty 1-D tensor")
    r = ranks.detach().cpu().to(torch.float64).numpy()
    if (r < 1).any():
        raise ValueError("ranks start at 1")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_AT}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def format_metrics(table: Dict[str, Dict[str, float]]) -> str:
    """A small aligned text table: one row per entry of ``table`` (name -> metrics)."""
    keys = [f"R@{k}" for k in RECALL_AT] + ["MdR", "MnR"]
    width = max([len("method")] + [len(name) for name in table])
    lines = [f"{'method':<{width}} " + " ".join(f"{k:>7}" for k in keys)]
    for name, m in table.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{m[k]:7.2f}" for k in keys))
    return "\n".join(lines)
