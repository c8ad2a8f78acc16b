"""Two towers (MLP projection heads over precomputed features) and their training loop."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import NCLLoss
from .data import Paired


class Tower(nn.Module):
    """An MLP projection head onto the unit sphere of the shared space."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(),
                                 nn.Linear(d_hidden, d_hidden), nn.GELU(),
                                 nn.Linear(d_hidden, d_out))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


class DualEncoder(nn.Module):
    """Text and video towers and CLIP's learnable ``logit_scale`` (scale = exp, <= 100)."""

    def __init__(self, text_dim: int, video_dim: int, d_hidden: int = 256, d_out: int = 64):
        super().__init__()
        self.text = Tower(text_dim, d_hidden, d_out)
        self.video = Tower(video_dim, d_hidden, d_out)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self):
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    @torch.no_grad()
    def embed(self, data: Paired, device):
        self.eval()
        return self.text(data.text.to(device)), self.video(data.video.to(device))


def make_loss(kind: str, queue_size: int = 0, positives: str = "mean",
              n_iters: int | None = None) -> NCLLoss:
    """The two losses of the demo, both :class:`~ncl_kernels.NCLLoss`.

    ``"clip"``: ``n_iters=0``, which is exactly CLIP's symmetric InfoNCE (docs/math.md section
    3). ``"ncl"``: NCLLoss's defaults (converged batch biases; ``n_iters`` overrides),
    plus, with ``queue_size > 0``, a queue of that many earlier embeddings that only shapes
    the biases (``queue_as_negatives=False``: the loss's softmax runs over the same batch as
    CLIP's, so the two runs differ by the normalization alone, not by extra negatives),
    with the training terms a queue turns on (docs/training.md). ``positives``: the
    video-to-text targets of both (see :class:`~ncl_kernels.NCLLoss`).
    """
    if kind == "clip":
        return NCLLoss(n_iters=0, positives=positives)
    options = {} if n_iters is None else {"n_iters": n_iters}
    if queue_size:
        return NCLLoss(queue_size=queue_size, queue_as_negatives=False, positives=positives,
                       **options)
    return NCLLoss(positives=positives, **options)


def train(data: Paired, loss_fn: NCLLoss, *, steps: int, batch_size: int, lr: float,
          seed: int, device, progress=None, init: DualEncoder | None = None,
          whole_videos: bool = False) -> DualEncoder:
    """Train a :class:`DualEncoder` for ``steps`` steps of AdamW (cosine decay): a fresh
    one, or a copy of ``init`` (fine-tuning; ``init`` is left as it is).

    Each step takes ``batch_size`` captions (epochs of a seeded permutation of all training
    captions) and their videos, each video once, and calls ``loss_fn(text, video, scale,
    caption_to_video=...)``: a video that two captions of the batch describe is one
    column with two positives, not a false negative of itself. With ``whole_videos``, a
    step takes instead about ``batch_size`` captions' worth of whole videos (epochs of a
    permutation of the videos), each with all its captions. The seed fixes the
    initialization and the batch order, so two losses see the same budget and batches.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if init is None:
        model = DualEncoder(data.text.shape[1], data.video.shape[1]).to(device)
    else:
        model = copy.deepcopy(init).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    text, video = data.text.to(device), data.video.to(device)
    N = text.shape[0]
    B = min(batch_size, N)
    if whole_videos:   # draw videos; a batch is all their captions
        M = data.video.shape[0]
        captions = torch.argsort(data.text_to_video, stable=True)
        start = torch.searchsorted(data.text_to_video[captions], torch.arange(M + 1))
        N, B = M, max(1, min(M, round(B * M / N)))
    order, at = torch.randperm(N, generator=gen), 0
    model.train()
    for _ in (progress(range(steps)) if progress else range(steps)):
        if at + B > N:   # a new epoch; the last incomplete batch is dropped
            order, at = torch.randperm(N, generator=gen), 0
        rows = order[at:at + B]
        at += B
        if whole_videos:
            rows = torch.cat([captions[start[v]:start[v + 1]] for v in rows.tolist()])
        vids, c2v = torch.unique(data.text_to_video[rows], return_inverse=True)
        loss = loss_fn(model.text(text[rows.to(device)]), model.video(video[vids.to(device)]),
                       model.scale(), caption_to_video=c2v.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model
