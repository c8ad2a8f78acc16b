"""``NCLLoss``: an ``nn.Module`` drop-in for a CLIP loss."""

from __future__ import annotations

import torch
from torch import nn

from . import _validate as V
from .loss import ncl_loss, ncl_loss_embeddings

MODES = ("auto", "dense", "streaming")


class NCLLoss(nn.Module):
    """Normalized contrastive loss between paired text and video (or image) features.

    ``forward(text_features, video_features, scale)`` takes a batch of N pairs (row i of
    each is a positive pair) and the multiplier ``scale`` (already exponentiated, as
    open_clip passes ``logit_scale.exp()``), and returns the NCL loss of SPEC.md section 3
    with the biases from ``n_iters`` Sinkhorn iterations.

    Args:
        n_iters: Sinkhorn iterations for the biases (0: CLIP's symmetric InfoNCE).
        weights: ``(w_text_to_video, w_video_to_text)``.
        mode: ``"dense"`` forms ``text @ video.T`` with autograd and runs the dense loss
            with ``inplace_backward=True`` (the matrix is internal, so its storage is
            reused for its gradient); ``"streaming"`` never forms it; ``"auto"`` streams
            once the matrix would exceed ``stream_above`` elements.
        backend: see :func:`ncl_kernels.backends`.
    """

    def __init__(self, n_iters: int = 4, weights=(0.5, 0.5), *, mode: str = "auto",
                 stream_above: int = 1 << 26, backend: str = "auto"):
        super().__init__()
        V.iterations(n_iters, None, 1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        self.n_iters, self.weights = n_iters, V.weights(weights)
        self.mode, self.stream_above, self.backend = mode, int(stream_above), backend

    def forward(self, text_features: torch.Tensor, video_features: torch.Tensor,
                scale) -> torch.Tensor:
        x, y = V.embeddings(text_features, video_features)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"text_features and video_features must hold the same number of "
                             f"pairs; got {x.shape[0]} and {y.shape[0]}")
        options = dict(n_iters=self.n_iters, weights=self.weights, backend=self.backend)
        streaming = self.mode == "streaming" or (
            self.mode == "auto" and x.shape[0] * y.shape[0] > self.stream_above)
        if streaming:
            return ncl_loss_embeddings(x, y, scale, **options)
        return ncl_loss(x @ y.T, scale, inplace_backward=True, **options)

    def extra_repr(self) -> str:
        return f"n_iters={self.n_iters}, weights={self.weights}, mode={self.mode!r}"
