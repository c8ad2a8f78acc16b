"""Paired datasets for the demo: synthetic (default), scikit-learn digits, or your own npz.

Every source returns a :class:`Paired`: text features (N x Dt), video features (M x Dv) and
``text_to_video`` (N,) int64, the caption -> video index. :func:`split_by_video` holds out
whole videos (with all their captions), so no test video was seen in training.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class Paired:
    text: Tensor            # (N, Dt) float32
    video: Tensor           # (M, Dv) float32
    text_to_video: Tensor   # (N,) int64, values in [0, M)

    @property
    def sizes(self) -> dict:
        return {"videos": self.video.shape[0], "captions": self.text.shape[0]}


# -- synthetic ----------------------------------------------------------------------------

POPULARITY = ("zipf", "reversed")


def synthetic(n_videos: int = 5000, captions_per_video: int = 5, *, seed: int = 0,
              world_seed: int | None = None, popularity: str = "zipf",
              hubness: float = 1.0, hub_sigma: float = 1.0, n_concepts: int = 64,
              latent_dim: int = 32, mean_concepts: float = 3.0, mention: float = 0.5,
              noise: float = 0.1, text_dim: int = 64, video_dim: int = 96) -> Paired:
    """A seeded paired dataset whose generative model produces hubs.

    The *world* (seeded by ``world_seed``, default ``seed``) is fixed: concepts, their
    popularity order and the two sensors. The items (seeded by ``seed``) are drawn from it:

    1. Concepts with skewed popularity: ``n_concepts`` random unit directions ``u_k`` of a
       latent space (dimension ``latent_dim``), with Zipf popularity ``pi_k ~ 1 / k``
       (``popularity="reversed"``: ``pi_k ~ 1 / (n_concepts + 1 - k)``, another
       distribution over the same concepts: what is common in one is rare in the other).
    2. Video ``v`` shows ``1 + Poisson(mean_concepts - 1)`` distinct concepts drawn by
       popularity, each with a weight ``w_vk ~ U(0.5, 1.5)``: latent
       ``z_v = sum_k w_vk u_k + hubness * h_v * mu``.
    3. Caption ``c`` of video ``v`` (``captions_per_video`` of them) is a partial
       description: it mentions each concept of its video with probability ``mention`` (at
       least one), ``z_c = sum_{k mentioned} w_vk u_k``.
    4. Modality-specific nonlinear maps and noise: text features ``A2 tanh(A1 z_c) + e``,
       video features ``B2 softplus(B1 z_v) + e`` (fixed random weights, different widths;
       ``e`` Gaussian with standard deviation ``noise``).

    Two kinds of hubs:

    - Vague captions: a caption mentions only part of its video, so it also fits the other
      videos that show what it mentions. A video that shows one concept strongly is the
      best fit for every caption that mentions only that concept, and popular concepts
      have many such captions.
    - Item-level hubs (``hubness``): each video mixes in generic content, the expected
      video latent ``mu = mean_concepts * sum_k pi_k u_k``, with a weight ``h_v``
      (lognormal with log-sd ``hub_sigma``, scaled to mean 1). A video near the centroid
      of the data is close to every query whatever the query says: the item-level hubness
      of high-dimensional embedding spaces, which pretrained spaces show. No caption
      describes it, so a model must learn to ignore it. Measured (docs/training.md, the
      synthetic data): it lowers retrieval, the pretrained towers' most, and widens their
      per-caption offsets, but it hardly changes how unevenly the summed retrieval
      probability spreads over the videos: the vague captions make most of that.

    Returns:
        :class:`Paired` with ``n_videos * captions_per_video`` captions; caption ``i``
        describes video ``i // captions_per_video``.
    """
    if popularity not in POPULARITY:
        raise ValueError(f"popularity must be one of {POPULARITY}; got {popularity!r}")
    world = np.random.default_rng(seed if world_seed is None else world_seed)
    u = _unit(world.standard_normal((n_concepts, latent_dim)))
    text_map = _random_map(world, latent_dim, 128, text_dim)
    video_map = _random_map(world, latent_dim, 192, video_dim)
    pop = 1.0 / np.arange(1, n_concepts + 1)
    if popularity == "reversed":
        pop = pop[::-1].copy()
    pop /= pop.sum()

    rng = np.random.default_rng([seed, 1])   # the items: independent of the world's stream
    shown = np.minimum(1 + rng.poisson(mean_concepts - 1, size=n_videos), n_concepts)
    W = np.zeros((n_videos, n_concepts))
    for v in range(n_videos):
        concepts = rng.choice(n_concepts, size=shown[v], replace=False, p=pop)
        W[v, concepts] = rng.uniform(0.5, 1.5, size=shown[v])
    c2v = np.repeat(np.arange(n_videos), captions_per_video)
    said = (rng.random((c2v.size, n_concepts)) < mention) & (W[c2v] > 0)
    silent = ~said.any(1)   # a caption says something: its video's first concept
    said[silent, np.argmax(W[c2v[silent]] > 0, axis=1)] = True
    z_video = W @ u
    if hubness:
        h = rng.lognormal(0.0, hub_sigma, size=n_videos)
        z_video = z_video + (hubness * h / h.mean())[:, None] * (mean_concepts * pop @ u)
    text = np.tanh((said * W[c2v]) @ u @ text_map[0]) @ text_map[1] \
        + noise * rng.standard_normal((c2v.size, text_dim))
    video = np.logaddexp(0.0, z_video @ video_map[0]) @ video_map[1] \
        + noise * rng.standard_normal((n_videos, video_dim))
    return Paired(torch.from_numpy(text).float(), torch.from_numpy(video).float(),
                  torch.from_numpy(c2v).long())


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _random_map(rng, d_in, hidden, out):
    """The fixed random weights ``(W1, W2)`` of a two-layer map ``W2 act(W1 z)`` (the
    'sensor' of one modality)."""
    return (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in),
            rng.standard_normal((hidden, out)) / np.sqrt(hidden))


# -- scikit-learn digits ------------------------------------------------------------------

def digits() -> Paired:
    """scikit-learn's handwritten digits (1797 images of 8 x 8) as two views: the left
    half (8 x 4 pixels) is the "text", the right half the "video"; one caption each."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("--data digits needs scikit-learn: pip install "
                         "'ncl_kernels[demo]'") from e
    images = load_digits().images.astype(np.float32)     # (1797, 8, 8), ships with sklearn
    left = images[:, :, :4].reshape(len(images), -1)
    right = images[:, :, 4:].reshape(len(images), -1)
    return Paired(torch.from_numpy(left), torch.from_numpy(right),
                  torch.arange(len(images), dtype=torch.int64))


# -- bring your own -----------------------------------------------------------------------

NPZ_ARRAYS = ("text", "video", "text_to_video")


def from_npz(path: str) -> Paired:
    """Features from ``path``: arrays ``text`` (N x Dt), ``video`` (M x Dv) and
    ``text_to_video`` (N,) integers in ``[0, M)``. Raises ``ValueError`` saying what is
    wrong. Videos without any caption are dropped (they cannot be retrieved by text, and
    video-to-text needs a positive)."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file (expected 'synthetic', 'digits' or "
                         f"an .npz file)")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip or .npy file, or a pickle
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e
    if not hasattr(npz, "files"):
        raise ValueError(f"{path} holds one array, not an .npz archive of named arrays "
                         f"{list(NPZ_ARRAYS)}")
    with npz:
        missing = [k for k in NPZ_ARRAYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks array(s) {missing}; it needs {list(NPZ_ARRAYS)} "
                             f"(has {sorted(npz.files)})")
        try:
            text, video, c2v = (np.asarray(npz[k]) for k in NPZ_ARRAYS)
        except Exception as e:  # object arrays (pickles), a damaged member
            raise ValueError(f"{path}: cannot read its arrays: {e}") from e
    for name, a in (("text", text), ("video", video)):
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{path}: {name} must be a non-empty 2-D array; got shape "
                             f"{a.shape}")
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ValueError(f"{path}: {name} must be real numbers; got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: {name} contains NaN or inf")
    if c2v.ndim != 1 or c2v.shape[0] != text.shape[0]:
        raise ValueError(f"{path}: text_to_video must have shape ({text.shape[0]},) (one video "
                         f"index per row of text); got {c2v.shape}")
    if not np.issubdtype(c2v.dtype, np.integer):
        raise ValueError(f"{path}: text_to_video must be integers; got dtype {c2v.dtype}")
    bad = (c2v < 0) | (c2v >= video.shape[0])
    if bad.any():
        raise ValueError(f"{path}: text_to_video must index video rows in [0, "
                         f"{video.shape[0]}); got {int(c2v[bad][0])}")
    used = np.bincount(c2v, minlength=video.shape[0]) > 0
    if not used.all():   # renumber the videos that have captions
        warnings.warn(f"{path}: dropped {int((~used).sum())} of {len(used)} videos that "
                      f"have no caption", stacklevel=2)
        new = np.cumsum(used) - 1
        video, c2v = video[used], new[c2v]
    return Paired(torch.from_numpy(text.astype(np.float32)),
                  torch.from_numpy(video.astype(np.float32)),
                  torch.from_numpy(c2v.astype(np.int64)))


# -- split and standardize ----------------------------------------------------------------

def split_by_video(data: Paired, test_fraction: float, seed: int, *,
                   standardize_with: Paired | None = None, standardize: bool = True):
    """``(train, test)``: a seeded random ``test_fraction`` of the videos, with all their
    captions, is held out; videos are renumbered within each part. Both parts are
    z-scored per feature with the statistics of ``standardize_with`` (default: the
    training part; the towers are plain MLPs), or not at all with ``standardize=False``."""
    M = data.video.shape[0]
    n_test = int(round(M * test_fraction))
    if n_test < 2 or M - n_test < 2:
        raise ValueError(f"need at least 2 training and 2 test videos; got {M} videos")
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    parts = []
    for vids in (perm[n_test:].sort().values, perm[:n_test].sort().values):
        new = torch.full((M,), -1, dtype=torch.int64)
        new[vids] = torch.arange(vids.numel())
        rows = (new[data.text_to_video] >= 0).nonzero().squeeze(1)
        parts.append(Paired(data.text[rows], data.video[vids], new[data.text_to_video[rows]]))
    train, test = parts
    if standardize:
        z_score(train if standardize_with is None else standardize_with, train, test)
    return train, test


def z_score(reference: Paired, *parts: Paired) -> None:
    """Standardize each feature of ``parts`` (in place) with ``reference``'s mean and sd
    (computed before any part changes, so ``reference`` may be one of them)."""
    stats = {name: (getattr(reference, name).mean(0),
                    getattr(reference, name).std(0).clamp(min=1e-6))
             for name in ("text", "video")}
    for part in parts:
        for name, (mu, sd) in stats.items():
            setattr(part, name, (getattr(part, name) - mu) / sd)
