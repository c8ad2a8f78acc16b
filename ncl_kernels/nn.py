"""``NCLLoss``: an ``nn.Module`` drop-in for a CLIP loss, with an optional queue."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _nn_terms as T, _ops, _validate as V
from .loss import _loss_options, ncl_loss, ncl_loss_embeddings

Tensor = torch.Tensor
MODES = ("auto", "dense", "streaming")
_QUEUE = ("queue_text", "queue_video", "queue_video_mass")
#: ``offset_penalty`` when a queue is on and none is given (docs/training.md)
OFFSET_PENALTY = 0.01


def _value(scale):
    """``scale`` without its graph (the biases are constants for the gradient)."""
    return scale.detach() if isinstance(scale, Tensor) else scale


def _pad_targets(t: Optional[Tensor], n: int) -> Optional[Tensor]:
    """Targets of the batch, then ``-1`` (no loss term) for the queued rows/columns."""
    if t is None or t.shape[0] == n:
        return t
    return torch.cat([t, t.new_full((n - t.shape[0],), -1)])


class NCLLoss(nn.Module):
    """Normalized contrastive loss between text and video (or image) features.

    ``forward(text_features, video_features, scale, caption_to_video=None)`` takes a
    batch of N captions and V videos and the multiplier ``scale`` (already exponentiated,
    as open_clip passes ``logit_scale.exp()``; a number or a 0-dim tensor that may require
    grad), and returns the NCL loss of SPEC.md section 3 with the biases from ``n_iters``
    Sinkhorn iterations.

    Targets. Without ``caption_to_video`` the batch is N = V pairs (row i with column i).
    With it (int64 (N,), values in ``[0, V)``), caption i's positive is video
    ``caption_to_video[i]``, and video j's positives in its video-to-text term are its
    captions in the batch, as ``positives`` says: ``"mean"`` (default) the mean over them
    of one cross-entropy term per caption (same softmax); ``"all"`` minus the log of the
    probability the video gives to any of them; ``"first"`` only its first caption, its
    other captions being negatives. A video without captions has no loss term. The column
    masses are proportional to each video's caption count (row masses are 1), so a video
    with k captions receives k times the mass; a video without captions has mass 0.

    Queue (``queue_size`` K > 0). The module keeps, detached, the K most recent *earlier*
    caption embeddings and the K most recent earlier video embeddings (with their column
    masses), as buffers (``queue_text``, ``queue_video``, ``queue_video_mass``: they move
    with ``.to()`` and round-trip exactly through ``state_dict()``). A step solves the
    problem on ``[batch; queue]`` (batch rows/columns first, queue rows oldest first), then
    enqueues the current batch (after its loss is computed; the oldest rows fall out).
    Queued rows and columns have no loss term. With ``queue_as_negatives=False`` (default)
    they only shape the biases: ``f, g`` come from Sinkhorn on the whole problem and the
    loss runs over the batch block with ``f[:N], g[:V]``. With ``True`` they also join the
    softmax denominators: the loss is ``ncl_loss_embeddings([x; Qx], [y; Qy], ...)``;
    without a slowly moving (momentum) encoder for them, as MoCo uses, they are stale
    negatives, and in the demo's towers that hurt retrieval with CLIP's loss and NCL's
    alike (docs/training.md). No gradient flows into the queue.

    Offset drift (docs/training.md). The biases are constants for the gradient, and they
    absorb any per-caption or per-video offset of the logits. When they are exactly the
    batch's converged biases and each caption is one target, the gradient has no component
    along such offsets. Otherwise (a queue, too few iterations, several positives per
    video) it keeps pushing offsets that the next solve absorbs, so nothing pulls them back
    and they grow. Two terms counter it, on by default when it applies:
    ``bias_gradient`` adds each bias's dependence on its own row or column to the gradient
    (a zero-valued term: the loss value is unchanged), and ``offset_penalty`` adds
    ``offset_penalty * (Var_i(scale <x_i, mean y>) + Var_j(scale <y_j, mean x>))`` over the
    batch, a restoring force on the offsets.

    Args:
        n_iters: Sinkhorn iterations for the biases (0: CLIP's symmetric InfoNCE). The
            default, 20, is close to converged for the logits of training (few-iteration
            biases let the offsets drift).
        weights: ``(w_text_to_video, w_video_to_text)``.
        queue_size: K (0: no queue).
        queue_as_negatives: see above.
        mode: ``"dense"`` forms the score matrix with autograd and runs the dense loss with
            ``inplace_backward=True`` (the matrix is internal, so its storage is reused for
            its gradient); ``"streaming"`` never forms it; ``"auto"`` streams once the
            matrix (queue included) would exceed ``stream_above`` elements.
        backend: see :func:`ncl_kernels.backends`.
        positives: ``"mean"``, ``"all"`` or ``"first"``: see Targets.
        bias_gradient: ``None`` (default): on when a queue is on, and for batches with
            several captions of a video when ``positives`` is not ``"first"``; ``True`` or
            ``False`` forces it. No effect with ``n_iters=0``.
        offset_penalty: the weight above, >= 0; ``None`` (default): ``OFFSET_PENALTY``
            with a queue, else 0.
    """

    def __init__(self, n_iters: int = 20, weights=(0.5, 0.5), *, queue_size: int = 0,
                 queue_as_negatives: bool = False, mode: str = "auto",
                 stream_above: int = 1 << 26, backend: str = "auto",
                 positives: str = "mean", bias_gradient: Optional[bool] = None,
                 offset_penalty: Optional[float] = None):
        super().__init__()
        V.iterations(n_iters, None, 1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 0:
            raise ValueError(f"queue_size must be an integer >= 0; got {queue_size!r}")
        self.n_iters, self.weights = n_iters, V.weights(weights)
        self.queue_size = queue_size
        self.queue_as_negatives = V.flag("queue_as_negatives", queue_as_negatives)
        self.mode, self.stream_above, self.backend = mode, int(stream_above), backend
        self._set_training_terms(positives, bias_gradient, offset_penalty)
        # empty until the first step fixes D, dtype and device
        self.register_buffer("queue_text", torch.empty(0, 0))
        self.register_buffer("queue_video", torch.empty(0, 0))
        self.register_buffer("queue_video_mass", torch.empty(0))

    def _set_training_terms(self, positives, bias_gradient, offset_penalty) -> None:
        """The options beyond the loss op (docs/training.md); ``None``: the default, which
        depends on whether a queue is on."""
        self.positives = V.choice("positives", positives, T.POSITIVES)
        queue = self.queue_size > 0 and self.n_iters > 0
        #: None: decided per batch (a queue, or several captions of a video as positives)
        self.bias_gradient = None if bias_gradient is None and not queue else \
            V.flag("bias_gradient", True if bias_gradient is None else bias_gradient)
        if offset_penalty is None:
            offset_penalty = OFFSET_PENALTY if queue else 0.0
        if (not isinstance(offset_penalty, (int, float)) or isinstance(offset_penalty, bool)
                or not offset_penalty >= 0 or offset_penalty == float("inf")):
            raise ValueError(f"offset_penalty must be a finite number >= 0; got "
                             f"{offset_penalty!r}")
        self.offset_penalty = float(offset_penalty)

    # -- the queue ------------------------------------------------------------------------
    def reset_queue(self) -> None:
        """Empty the queue (e.g. between epochs of a different dataset)."""
        for name in _QUEUE:
            old = getattr(self, name)
            setattr(self, name, old.new_empty((0, 0) if old.dim() == 2 else (0,)))

    def _queued(self, like: Tensor):
        """The queue in ``like``'s dtype and device (``None`` when empty or disabled)."""
        if self.queue_size == 0 or self.queue_text.shape[0] == 0:
            return None
        qx, qy = self.queue_text, self.queue_video
        if qx.shape[1] != like.shape[1]:
            raise ValueError(f"the queue holds embeddings of size {qx.shape[1]} but this batch "
                             f"has D = {like.shape[1]}; call reset_queue() first")
        return (qx.to(like), qy.to(like), self.queue_video_mass.to(like.device))

    @torch.no_grad()
    def _enqueue(self, x: Tensor, y: Tensor, mass: Tensor) -> None:
        K = self.queue_size
        queued = self._queued(x)
        if queued is not None:
            x = torch.cat([queued[0], x])
            y = torch.cat([queued[1], y])
            mass = torch.cat([queued[2], mass.to(queued[2].dtype)])
        self.queue_text = x[-K:].detach().clone()
        self.queue_video = y[-K:].detach().clone()
        self.queue_video_mass = mass[-K:].detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the queue buffers change shape as they fill: take the saved shapes before loading
        for name in _QUEUE:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor):
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the loss -------------------------------------------------------------------------
    def _batch_targets(self, n: int, v: int, caption_to_video: Optional[Tensor], like: Tensor):
        """``(row_targets, col_targets, col_mass)`` of the batch block (``None``: defaults)."""
        if caption_to_video is None:
            if n != v:
                raise ValueError(f"text_features and video_features must hold the same number "
                                 f"of pairs; got {n} and {v} (pass caption_to_video for "
                                 f"several captions per video)")
            return None, None, None
        c2v = V._target_meta("caption_to_video", caption_to_video, n, like)
        if not torch.compiler.is_compiling():  # under compile the loss op checks the range
            V._target_values("caption_to_video", c2v, v, "video")
        rows = torch.arange(n, device=like.device)
        first = torch.full((v,), n, dtype=torch.int64, device=like.device)
        first = first.scatter_reduce(0, c2v.clamp(0, v - 1), rows, "amin")
        z = torch.where(first == n, torch.full_like(first, -1), first)
        counts = torch.zeros(v, dtype=torch.float64, device=like.device)
        counts = counts.index_add(0, c2v.clamp(0, v - 1), torch.ones(n, dtype=counts.dtype,
                                                                     device=like.device))
        return c2v, z, counts

    def forward(self, text_features: Tensor, video_features: Tensor, scale,
                caption_to_video: Optional[Tensor] = None) -> Tensor:
        x, y = V.embeddings_meta(text_features, video_features,
                                       ("text_features", "video_features"))
        N, Vb = x.shape[0], y.shape[0]
        y_t, z_t, counts = self._batch_targets(N, Vb, caption_to_video, x)
        queued = self._queued(x)
        X, Y, mass = x, y, counts
        if queued is not None:
            X, Y = torch.cat([x, queued[0]]), torch.cat([y, queued[1]])
            mass = torch.cat([torch.ones(Vb, dtype=torch.float64, device=x.device)
                              if counts is None else counts, queued[2].double()])
        NT, MT = X.shape[0], Y.shape[0]
        if y_t is None and queued is not None:
            y_t, z_t = V.default_targets(N, Vb, x.device)
        y_t, z_t = _pad_targets(y_t, NT), _pad_targets(z_t, MT)
        col_mass = None
        if mass is not None:
            # proportional to caption counts, with the rows' total (SPEC.md section 1); with
            # one caption per video this is the uniform default (decided without reading
            # data, so that a compiled step has no data-dependent branch)
            col_mass = mass * (NT / mass.sum())
        dense = self.mode == "dense" or (self.mode == "auto" and NT * MT <= self.stream_above)
        options = dict(n_iters=self.n_iters, weights=self.weights, backend=self.backend,
                       row_targets=y_t, col_targets=z_t, col_mass=col_mass)
        several = self.positives != "first" and caption_to_video is not None
        bias_gradient = self.n_iters > 0 and (
            several if self.bias_gradient is None else self.bias_gradient)
        biases_only = queued is not None and not self.queue_as_negatives
        if several or bias_gradient or self.offset_penalty or biases_only:
            block = (N, Vb) if biases_only else (NT, MT)
            loss = self._loss_with_terms(x, y, X, Y, scale, dense, options, block,
                                         (y_t, z_t, counts) if several else None,
                                         bias_gradient)
        elif dense:   # the biases are solved inside the loss op
            loss = ncl_loss(X @ Y.T, scale, inplace_backward=True, **options)
        else:
            loss = ncl_loss_embeddings(X, Y, scale, **options)
        if self.queue_size:
            self._enqueue(x, y, torch.ones(Vb, dtype=torch.float64, device=x.device)
                          if counts is None else counts)
        return loss

    def _loss_with_terms(self, x, y, X, Y, scale, dense, options, block, several,
                         bias_gradient):
        """The biases solved here on the whole problem ``X, Y`` (queue included), the loss
        op on ``block`` with them (the batch when the queue only shapes the biases, else
        everything), plus the optional terms of docs/training.md."""
        NT, MT = X.shape[0], Y.shape[0]
        nb, mb = block
        w_row, w_col = self.weights
        f, g = self._solve(X, Y, scale, dense, options["col_mass"])
        y_all, z_all = options["row_targets"], options["col_targets"]
        if y_all is None:
            y_all, z_all = V.default_targets(NT, MT, X.device)
        loss_options = dict(n_iters=0, weights=self.weights, backend=self.backend,
                            row_targets=y_all[:nb], col_targets=z_all[:mb], f=f[:nb],
                            g=g[:mb])
        Xb, Yb = X[:nb], Y[:mb]
        if dense:
            loss = ncl_loss(Xb @ Yb.T, scale, inplace_backward=True, **loss_options)
        else:
            loss = ncl_loss_embeddings(Xb, Yb, scale, **loss_options)
        weights_t = None
        if several is not None:   # every caption of a video is its positive
            N, Vb = x.shape[0], y.shape[0]
            c2v, z, counts = several[0][:N], several[1][:Vb], several[2]
            loss = loss + T.all_positives(x, y, scale, c2v, z, counts, f[:N], w_col,
                                          self.positives)
            a = T.positive_logits(x.detach(), y.detach(), _value(scale), c2v, f[:N])
            weights_t = T.target_weights(a, c2v, counts, self.positives)
            weights_t = torch.cat([weights_t, weights_t.new_zeros(nb - N)])
        if bias_gradient:
            loss = loss + T.own_bias_term(
                X, Y, scale, f, g, nb, mb, y_all, z_all, w_row, w_col,
                col_target_weights=weights_t, dense=dense,
                rows_per_chunk=max(1, self.stream_above // max(NT, MT)), backend=self.backend)
        if self.offset_penalty:
            loss = loss + self.offset_penalty * T.offset_spread(x, y, scale)
        return loss

    def _solve(self, X, Y, scale, dense, col_mass):
        """Sinkhorn biases of the whole problem (detached); zeros for ``n_iters = 0``.

        They come from the loss op's forward, which returns them (the op is what
        ``torch.compile`` traces; ``sinkhorn`` validates data in Python), at the cost of
        one LSE pass more than the solve."""
        NT, MT = X.shape[0], Y.shape[0]
        if self.n_iters == 0:
            f = X.new_zeros(NT, dtype=torch.float64 if X.dtype == torch.float64
                            else torch.float32)
            return f, f.new_zeros(MT)
        with torch.no_grad():
            X, Y = X.detach(), Y.detach()
            S = X @ Y.T if dense else None
            (scale_t, scale_f, yt, zt, r, c, f, g, n_iters, w_row,
             w_col) = _loss_options(X, NT, MT, _value(scale), None, None, self.n_iters, None,
                                    None, self.weights, None, col_mass)
            if dense:
                out = _ops.loss_dense(S, scale_t, scale_f, self.backend, yt, zt, r, c, f, g,
                                      n_iters, w_row, w_col, False)
            else:
                out = _ops.loss_xy(X, Y, scale_t, scale_f, self.backend, yt, zt, r, c, f, g,
                                   n_iters, w_row, w_col)
        return out[1], out[2]

    def extra_repr(self) -> str:
        return (f"n_iters={self.n_iters}, weights={self.weights}, mode={self.mode!r}, "
                f"queue_size={self.queue_size}, queue_as_negatives={self.queue_as_negatives}, "
                f"positives={self.positives!r}, bias_gradient={self.bias_gradient}, "
                f"offset_penalty={self.offset_penalty}")
