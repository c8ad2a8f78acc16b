"""Held-out retrieval metrics and the summed retrieval probability of every test item."""

from __future__ import annotations

import torch

from .. import retrieval as R

#: metrics.json's method names -> the ``method`` of ncl_kernels.retrieval.gallery_bias
#: (``None``: no bias, the plain logits)
METHODS = {"none": None, "ncl_bank": "ncl", "qbnorm": "qbnorm"}

#: the scores each training run ranks with, whose normalization error metrics.json reports
RANKS_WITH = {"clip": "none", "ncl": "ncl_bank"}


def summed_probability(queries, gallery, scale: float, bias=None, chunk: int = 4096):
    """Per-item summed retrieval probability, normalized so that the ideal is 1.

    ``P_ij = softmax_j(scale * <q_i, y_j> + bias_j)`` over the M gallery items for each of
    the Q queries (each query's retrieval probabilities sum to one: row mass 1, docs/math.md
    section 1), summed over the queries and multiplied by ``M / Q``. docs/math.md's default
    item mass is ``c_j = Q / M`` (section 1), the marginal that NCL's Sinkhorn biases
    enforce (sections 2 and 4), so a perfectly normalized model gives 1 for every item; a
    hub gets more, an item that nobody retrieves 0.
    """
    total = torch.zeros(gallery.shape[0], dtype=torch.float64, device=gallery.device)
    for i in range(0, queries.shape[0], chunk):
        logits = scale * queries[i:i + chunk] @ gallery.T
        if bias is not None:
            logits = logits + bias
        total += torch.softmax(logits.double(), dim=1).sum(0)
    return total * (gallery.shape[0] / queries.shape[0])


def normalization_error(summed) -> float:
    """``mean_j |summed_j - 1|`` over the test items (0: perfectly normalized)."""
    return float((summed - 1).abs().mean())


def bank_rows(n: int, size: int, seed: int):
    """Indices of at most ``size`` training queries (seeded), the bank of docs/math.md section 4:
    a sample keeps the test-time Sinkhorn cheap on large training sets."""
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def evaluate_run(model, train, test, device, *, bank_size: int = 8192, seed: int = 0):
    """Metrics of one trained model on the held-out videos.

    Text-to-video: the test captions query the test videos; video-to-text: the test videos
    query the test captions (a video's rank is its best caption's). Each direction ranks
    by ``scale * <q, y_j> + bias_j`` (``scale``: the model's) under every method of
    :data:`METHODS`; the gallery bias comes from a bank of training queries (training
    captions for text-to-video, training videos for video-to-text).

    Returns:
        ``(run, summed)``: ``run = {"t2v": {method: metrics}, "v2t": {...}}``, and
        ``summed[method]``, the per-test-video summed text-to-video probability
        (:func:`summed_probability`) of the very scores that method ranks with.
    """
    scale = float(model.scale().detach())
    text, video = model.embed(test, device)
    bank_text, bank_video = model.embed(train, device)
    bank_text = bank_text[bank_rows(len(bank_text), bank_size, seed).to(device)]
    bank_video = bank_video[bank_rows(len(bank_video), bank_size, seed).to(device)]
    c2v = test.text_to_video.to(device)
    directions = {
        "t2v": (text, video, bank_text, R.text_to_video_targets(c2v)),
        "v2t": (video, text, bank_video, R.video_to_text_targets(c2v, len(video))),
    }
    run, summed = {"t2v": {}, "v2t": {}}, {}
    for way, (queries, gallery, bank, targets) in directions.items():
        for name, method in METHODS.items():
            bias = None if method is None else R.gallery_bias(bank, gallery, scale,
                                                              method=method)
            ranks = R.ranks(queries, gallery, targets, scale, bias=bias)
            run[way][name] = R.metrics(ranks)
            if way == "t2v":
                summed[name] = summed_probability(queries, gallery, scale, bias)
    return run, summed


@torch.no_grad()
def offset_spread(model, data, device) -> dict:
    """The spread of per-item logit offsets on ``data`` (docs/training.md, the drift):
    the standard deviation over captions of each caption's mean logit over the videos,
    ``scale * <x_i, mean_j y_j>``, and the same over videos."""
    scale = float(model.scale().detach())
    text, video = model.embed(data, device)
    return {"captions": float((scale * text @ video.mean(0)).std()),
            "videos": float((scale * video @ text.mean(0)).std())}
