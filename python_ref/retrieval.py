"""Float64 oracle for retrieval: gallery biases, re-scoring, ranks and metrics (docs/math.md section 4).

All dense and naive: the full query x gallery matrix is formed.
"""

import numpy as np
import torch

from ._common import check_matrix, scale_value
from .sinkhorn import sinkhorn

__all__ = [
    "gallery_bias",
    "scores",
    "qbnorm_dynamic_scores",
    "dual_softmax_scores",
    "ranks",
    "metrics",
    "text_to_video_targets",
    "video_to_text_targets",
]

RECALL_KS = (1, 5, 10, 50)


def gallery_bias(bank, gallery, scale=1.0, *, method="ncl", n_iters=100, tol=1e-4, dtype=torch.float64):
    """Per-item bias (M,) from a bank ``B`` (K x D) of training queries (docs/math.md section 4).

    ``"ncl"``: ``g`` of ``sinkhorn(B @ Y.T, scale)`` with the default masses ``r = 1``,
    ``c = K / M`` (``check_every`` 10). ``"qbnorm"``: the inverted-softmax bias
    ``-LSE_b(scale * <b, y_j>)`` (``scale`` plays ``beta``). Video-to-text: swap the roles.
    """
    B = bank.detach().to(dtype)
    Y = gallery.detach().to(dtype)
    S = B @ Y.T
    if method == "ncl":
        return sinkhorn(S, scale, n_iters=n_iters, tol=tol, dtype=dtype).g
    if method == "qbnorm":
        check_matrix(S, "bank @ gallery.T")
        return -torch.logsumexp(scale_value(scale) * S, dim=0)
    raise ValueError(f"method must be 'ncl' or 'qbnorm', got {method!r}")


def scores(queries, gallery, scale=1.0, bias=None, *, dtype=torch.float64):
    """Test-time scores ``scale * Q @ Y.T + bias[None, :]`` (Q x M); ``bias=None`` = no bias (docs/math.md section 4)."""
    out = scale_value(scale) * (queries.detach().to(dtype) @ gallery.detach().to(dtype).T)
    if bias is not None:
        out = out + bias.detach().to(dtype)[None, :]
    return out


def qbnorm_dynamic_scores(queries, gallery, bank, beta, *, dtype=torch.float64):
    """Dynamic inverted softmax (QB-Norm DIS, docs/math.md section 4), Q x M.

    ``A = {argmax_j <b, y_j> : b in B}``. A query whose top-1 item ``argmax_j <q, y_j>`` is
    in ``A`` gets the IS score ``beta * <q, y_j> - LSE_b(beta * <b, y_j>)``; any other query
    its raw score ``<q, y_j>``. The two branches are on different scales, which is fine:
    ranks only compare scores within one query's row. Ties in argmax: the lowest index
    (``torch.argmax``).
    """
    beta = scale_value(beta)
    Q = queries.detach().to(dtype)
    Y = gallery.detach().to(dtype)
    B = bank.detach().to(dtype)
    raw = Q @ Y.T
    bank_sims = B @ Y.T
    activation = torch.unique(bank_sims.argmax(dim=1))
    use_is = torch.isin(raw.argmax(dim=1), activation)
    inverted = beta * raw - torch.logsumexp(beta * bank_sims, dim=0)[None, :]
    return torch.where(use_is[:, None], inverted, raw)


def dual_softmax_scores(sim, beta, *, dtype=torch.float64):
    """Dual softmax (DSL, docs/math.md section 4): ``sim_ij * softmax_i(beta * sim_ij)``, softmax over the
    query dimension (dim 0), i.e. each gallery item's column is normalized over all queries."""
    S = sim.detach().to(dtype)
    return S * torch.softmax(scale_value(beta) * S, dim=0)


def ranks(score_matrix, targets):
    """1-based rank of each query's best positive (docs/math.md section 4), (Q,) int64.

    ``targets`` is (Q,) or (Q, P) padded with ``-1``; each row needs at least one valid
    positive (else ``ValueError``). For a positive t: ``1 + #{j != t : score[q, j] >=
    score[q, t]}`` (a tie counts against the query); the query's rank is the min over its
    positives. NaN scores raise ``ValueError``.
    """
    S = score_matrix.detach()
    if S.dim() != 2:
        raise ValueError("score_matrix must be 2-D (queries x gallery)")
    if torch.isnan(S).any():
        raise ValueError("score_matrix contains NaN")
    q, m = S.shape
    t = torch.as_tensor(targets, device=S.device).to(torch.int64)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != q:
        raise ValueError(f"targets must have shape ({q},) or ({q}, P), got {tuple(t.shape)}")
    if ((t < -1) | (t >= m)).any():
        raise ValueError(f"targets must be in [0, {m}) or -1 (padding)")
    valid = t >= 0
    if not valid.any(dim=1).all():
        raise ValueError("every query needs at least one valid target")
    t_safe = t.clamp(min=0)
    t_score = S.gather(1, t_safe)  # (Q, P)
    ge = S[:, None, :] >= t_score[:, :, None]  # (Q, P, M)
    not_self = torch.arange(m, device=S.device)[None, None, :] != t_safe[:, :, None]
    rank_per_positive = 1 + (ge & not_self).sum(dim=2)
    big = torch.full_like(rank_per_positive, m + 1)
    return torch.where(valid, rank_per_positive, big).min(dim=1).values.to(torch.int64)


def metrics(ranks):
    """``{"R@1", "R@5", "R@10", "R@50": 100 * mean(rank <= K), "MdR": median, "MnR": mean}``
    as Python floats (docs/math.md section 4); the median is numpy's (mean of the middle two for even Q)."""
    r = np.asarray(torch.as_tensor(ranks).detach().cpu().numpy(), dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("metrics of an empty rank vector")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_KS}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def text_to_video_targets(caption_to_video):
    """Targets for text-to-video: each caption's target is its video, (Q,) int64."""
    return torch.as_tensor(caption_to_video).to(torch.int64).clone()


def video_to_text_targets(caption_to_video, n_videos):
    """Targets for video-to-text, (n_videos, P) int64: row v lists the captions of video v
    in increasing order, padded with ``-1``; ``P`` is the largest caption count (>= 1)."""
    c2v = torch.as_tensor(caption_to_video).to(torch.int64).cpu()
    if ((c2v < 0) | (c2v >= n_videos)).any():
        raise ValueError(f"caption_to_video entries must be in [0, {n_videos})")
    lists = [[] for _ in range(n_videos)]
    for caption, video in enumerate(c2v.tolist()):
        lists[video].append(caption)
    p = max([len(x) for x in lists] + [1])
    out = torch.full((n_videos, p), -1, dtype=torch.int64)
    for v, caps in enumerate(lists):
        out[v, : len(caps)] = torch.tensor(caps, dtype=torch.int64)
    return out
