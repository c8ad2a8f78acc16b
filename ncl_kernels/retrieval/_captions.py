"""Targets for multi-caption datasets (MSR-VTT, MSVD: a variable number of captions per
video), from a caption -> video index ``caption_to_video`` (C,) int64."""

from __future__ import annotations

import torch

from .. import _validate as V

Tensor = torch.Tensor


def text_to_video_targets(caption_to_video: Tensor) -> Tensor:
    """(C,) int64 targets for text-to-video: each caption is its own query and its
    target is its video (a copy of the index, validated)."""
    c2v, _ = V.caption_index(caption_to_video)
    return c2v.clone()


def video_to_text_targets(caption_to_video: Tensor, n_videos: int | None = None) -> Tensor:
    """(n_videos, P) int64 targets for video-to-text: row ``v`` lists the captions of
    video ``v`` in increasing order, padded with -1; ``P`` is the largest caption count.

    With these targets :func:`ranks` gives each video the best rank among its captions
    (docs/math.md section 4). ``n_videos`` defaults to ``max(caption_to_video) + 1``; a video
    with no caption gets a row of -1, which :func:`ranks` rejects (drop that video from
    the queries first).
    """
    c2v, n_videos = V.caption_index(caption_to_video, n_videos)
    # stable sort by video keeps captions in increasing order within a video
    order = torch.sort(c2v, stable=True).indices
    videos = c2v[order]
    counts = torch.bincount(c2v, minlength=n_videos)
    first = torch.cumsum(counts, 0) - counts          # where each video's run starts
    slot = torch.arange(c2v.numel(), device=c2v.device) - first[videos]
    P = max(1, int(counts.max()))
    out = torch.full((n_videos, P), -1, dtype=torch.int64, device=c2v.device)
    out[videos, slot] = order
    return out
