"""``NCLLoss``: an ``nn.Module`` drop-in for a CLIP loss, with an optional queue."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _materialize as M_, _nn_terms as T, _validate as V
from .loss import embeddings_loss
from .sinkhorn import embeddings_solution

Tensor = torch.Tensor
MODES = ("auto", "dense", "streaming")
#: the queue's buffers: per side the embeddings (K, D), their masses (K,; 0 = empty slot)
#: and the next slot to write (a ring)
_SIDES = ("text", "video")
_QUEUE = tuple(f"queue_{side}{part}" for side in _SIDES for part in ("", "_mass", "_next"))
NAMES = ("text_features", "video_features")
#: ``offset_penalty`` when a queue is on and none is given (docs/training.md)
OFFSET_PENALTY = 0.01


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
    grad), and returns the NCL loss of docs/math.md section 3 with the biases from
    ``n_iters`` Sinkhorn iterations.

    Targets. Without ``caption_to_video`` the batch is N = V pairs (row i with column i).
    With it (int64 (N,), values in ``[0, V)`` or ``-1``), caption i's positive is video
    ``caption_to_video[i]``, and video j's positives in its video-to-text term are its
    captions in the batch, as ``positives`` says: ``"mean"`` (default) the mean over them
    of one cross-entropy term per caption (same softmax); ``"all"`` minus the log of the
    probability the video gives to any of them; ``"first"`` only its first caption, its
    other captions being negatives. A video without captions has no loss term. A caption
    marked ``-1`` has no loss term and no mass (it takes no part in the problem). The
    column masses are proportional to each video's caption count (row masses are 1), so a
    video with k captions receives k times the mass; a video without captions has mass 0.

    Queue (``queue_size`` K > 0). The module keeps, detached, the K most recent *earlier*
    caption embeddings and the K most recent earlier video embeddings (with their column
    masses) in fixed-size ring buffers (``queue_text``, ``queue_video`` and their
    ``_mass`` and ``_next`` companions: they move with ``.to()`` and round-trip exactly
    through ``state_dict()``). A step solves the problem on ``[batch; queue]`` (batch
    rows/columns first), then enqueues the current batch (after its loss is computed;
    the oldest entries are overwritten). Slots not yet written have mass 0, so they take
    no part; the buffers never change shape, so a compiled training step does not
    recompile while the queue fills. They are allocated at construction when
    ``embed_dim`` is given (in float32 on the CPU; ``.to()`` moves them), else at the
    first step in the batch's dtype and device (a compiled step then recompiles once).
    :meth:`queued` returns the filled entries, oldest first.

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
        embed_dim: D, to allocate the queue at construction (see above).
        mode: ``"dense"`` forms the score matrix once (float32, with autograd) and runs the
            dense loss with ``inplace_backward=True`` (the matrix is internal, so its
            storage is reused for its gradient; a second backward through the same step is
            then refused); ``"streaming"`` never forms it; ``"auto"`` forms it when it has
            at most ``stream_above`` elements (queue included) and the cost model of
            :func:`ncl_kernels.ncl_loss_embeddings` says that is faster.
        backend: see :func:`ncl_kernels.backends`.
        positives: ``"mean"``, ``"all"`` or ``"first"``: see Targets.
        bias_gradient: ``None`` (default): on when a queue is on, and for batches with
            several captions of a video when ``positives`` is not ``"first"``; ``True`` or
            ``False`` forces it. No effect with ``n_iters=0``.
        offset_penalty: the weight above, >= 0; ``None`` (default): ``OFFSET_PENALTY``
            with a queue, else 0.
    """

    def __init__(self, n_iters: int = 20, weights=(0.5, 0.5), *, queue_size: int = 0,
                 queue_as_negatives: bool = False, embed_dim: Optional[int] = None,
                 mode: str = "auto", stream_above: int = 1 << 26, backend: str = "auto",
                 positives: str = "mean", bias_gradient: Optional[bool] = None,
                 offset_penalty: Optional[float] = None):
        super().__init__()
        V.iterations(n_iters, None, 1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        self.queue_size = V.count("queue_size", queue_size)
        self.n_iters, self.weights = n_iters, V.weights(weights)
        self.queue_as_negatives = V.flag("queue_as_negatives", queue_as_negatives)
        self.mode, self.backend = mode, backend
        self.stream_above = V.count("stream_above", stream_above)
        self._set_training_terms(positives, bias_gradient, offset_penalty)
        for side in _SIDES:
            self.register_buffer(f"queue_{side}", torch.empty(0, 0))
            self.register_buffer(f"queue_{side}_mass", torch.empty(0, dtype=torch.float64))
            self.register_buffer(f"queue_{side}_next", torch.zeros((), dtype=torch.int64))
        if self.queue_size and embed_dim is not None:
            self._allocate(V.positive_int("embed_dim", embed_dim), torch.float32,
                           torch.device("cpu"))

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
    def _allocate(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        K = self.queue_size
        for side in _SIDES:
            setattr(self, f"queue_{side}", torch.zeros(K, dim, dtype=dtype, device=device))
            setattr(self, f"queue_{side}_mass",
                    torch.zeros(K, dtype=torch.float64, device=device))
            setattr(self, f"queue_{side}_next",
                    torch.zeros((), dtype=torch.int64, device=device))

    def reset_queue(self) -> None:
        """Empty the queue (e.g. for another dataset or embedding size): the next step
        allocates it again for its batch's D, dtype and device."""
        for name in _QUEUE:
            old = getattr(self, name)
            setattr(self, name, old.new_empty((0,) * old.dim()) if old.dim() else
                    torch.zeros_like(old))

    def queued(self):
        """``(text, video, video_mass)``: the filled entries of the queue, oldest first
        (copies; empty tensors when nothing is queued)."""
        out = []
        for side in _SIDES:
            buf, mass = getattr(self, f"queue_{side}"), getattr(self, f"queue_{side}_mass")
            if buf.shape[0] == 0:
                out.append((buf.new_empty(0, 0), mass.new_empty(0)))
                continue
            order = torch.roll(torch.arange(buf.shape[0], device=buf.device),
                               -int(getattr(self, f"queue_{side}_next")))
            keep = order[mass[order] > 0]
            out.append((buf[keep].clone(), mass[keep].clone()))
        (text, _), (video, video_mass) = out
        return text, video, video_mass

    def _queue(self, like: Tensor):
        """``(Qx, Qy, text mass, video mass)`` in ``like``'s dtype and device, allocating the
        buffers at the first step (``None`` without a queue)."""
        if self.queue_size == 0:
            return None
        if self.queue_text.shape[0] == 0:
            self._allocate(like.shape[1], like.dtype, like.device)
        qx, qy = self.queue_text, self.queue_video
        if qx.shape[1] != like.shape[1]:
            raise ValueError(f"the queue holds embeddings of size {qx.shape[1]} but this batch "
                             f"has D = {like.shape[1]}; call reset_queue() first")
        return qx.to(like), qy.to(like), self.queue_text_mass, self.queue_video_mass

    @staticmethod
    def _join_queue(x: Tensor, y: Tensor, row_mass: Optional[Tensor],
                    counts: Optional[Tensor], queue):
        """``(X, Y, row_mass, col_mass)``: the batch, then the queued entries (``queue``
        from :meth:`_queue`), with the batch's masses (ones where they are None) before
        the queue's; the column masses are not yet scaled to the rows' total."""
        if queue is None:
            return x, y, row_mass, counts
        qx, qy, q_text_mass, q_video_mass = queue
        ones = torch.ones(max(x.shape[0], y.shape[0]), dtype=torch.float64, device=x.device)
        rows = ones[:x.shape[0]] if row_mass is None else row_mass
        cols = ones[:y.shape[0]] if counts is None else counts
        return (torch.cat([x, qx]), torch.cat([y, qy]), torch.cat([rows, q_text_mass]),
                torch.cat([cols, q_video_mass]))

    def _enqueue_batch(self, x: Tensor, y: Tensor, row_mass: Tensor,
                       counts: Optional[Tensor]) -> None:
        """Enqueue this step's captions with their masses (the first rows of the joined
        ``row_mass``) and its videos with their caption counts (1 without them)."""
        self._enqueue("text", x, row_mass[:x.shape[0]])
        self._enqueue("video", y, torch.ones(y.shape[0], dtype=torch.float64, device=y.device)
                      if counts is None else counts)

    @torch.no_grad()
    def _enqueue(self, side: str, rows: Tensor, mass: Tensor) -> None:
        """Write the last ``min(n, K)`` rows into the ring, from its next slot on."""
        K = self.queue_size
        keep = min(rows.shape[0], K)
        buf = getattr(self, f"queue_{side}")
        nxt = getattr(self, f"queue_{side}_next")
        slots = (nxt + torch.arange(keep, device=buf.device)) % K
        buf.index_copy_(0, slots, rows[-keep:].detach().to(buf))
        getattr(self, f"queue_{side}_mass").index_copy_(0, slots, mass[-keep:].to(buf.device))
        nxt.copy_((nxt + keep) % K)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # the buffers are allocated at the first step (or from embed_dim): take the saved
        # shapes before loading; a queue saved by version 0.1 (variable length, oldest
        # first, no text masses or ring positions) is laid into the ring as it was
        saved = state_dict.get(prefix + "queue_text")
        if isinstance(saved, Tensor):
            if prefix + "queue_text_mass" not in state_dict and saved.shape[0]:
                self._upgrade_v0(state_dict, prefix)
                saved = state_dict[prefix + "queue_text"]
            for name in _QUEUE:
                value = state_dict.get(prefix + name)
                if isinstance(value, Tensor):
                    setattr(self, name, torch.empty_like(
                        value, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _upgrade_v0(self, state_dict, prefix) -> None:
        K = self.queue_size
        for side, default_mass in (("text", None), ("video", prefix + "queue_video_mass")):
            rows = state_dict[prefix + f"queue_{side}"][-K:]
            mass = (torch.ones(rows.shape[0], dtype=torch.float64) if default_mass is None
                    else state_dict[default_mass][-K:].to(torch.float64))
            buf = rows.new_zeros(K, rows.shape[1])
            buf[:rows.shape[0]] = rows
            ring_mass = torch.zeros(K, dtype=torch.float64, device=rows.device)
            ring_mass[:rows.shape[0]] = mass
            state_dict[prefix + f"queue_{side}"] = buf
            state_dict[prefix + f"queue_{side}_mass"] = ring_mass
            state_dict[prefix + f"queue_{side}_next"] = torch.tensor(rows.shape[0] % K)

    # -- the loss -------------------------------------------------------------------------
    def _batch_targets(self, n: int, v: int, caption_to_video: Optional[Tensor], like: Tensor):
        """``(row_targets, col_targets, row_mass, col_counts)`` of the batch block
        (``None``: the defaults)."""
        if caption_to_video is None:
            if n != v:
                raise ValueError(f"text_features and video_features must hold the same number "
                                 f"of pairs; got {n} and {v} (pass caption_to_video for "
                                 f"several captions per video)")
            return None, None, None, None
        c2v = V.target_meta("caption_to_video", caption_to_video, n, like)
        if not torch.compiler.is_compiling():  # under compile the loss op checks the range
            V.target_values("caption_to_video", c2v, v, "video")
        valid = c2v >= 0
        rows = torch.arange(n, device=like.device)
        video = c2v.clamp(min=0)
        # a caption marked -1 is nobody's first caption and counts for no video
        first = torch.full((v,), n, dtype=torch.int64, device=like.device)
        first = first.scatter_reduce(0, video, torch.where(valid, rows, n), "amin")
        z = torch.where(first == n, torch.full_like(first, -1), first)
        counts = torch.zeros(v, dtype=torch.float64, device=like.device)
        counts = counts.index_add(0, video, valid.to(counts.dtype))
        return c2v, z, valid.to(torch.float64), counts

    def forward(self, text_features: Tensor, video_features: Tensor, scale,
                caption_to_video: Optional[Tensor] = None) -> Tensor:
        x, y = V.embeddings_meta(text_features, video_features,
                                 ("text_features", "video_features"))
        N, Vb = x.shape[0], y.shape[0]
        y_t, z_t, row_mass, counts = self._batch_targets(N, Vb, caption_to_video, x)
        queue = self._queue(x)
        X, Y, row_mass, col_mass = self._join_queue(x, y, row_mass, counts, queue)
        if queue is not None and y_t is None:
            y_t, z_t = V.default_targets(N, Vb, x.device)
        NT, MT = X.shape[0], Y.shape[0]
        y_t, z_t = _pad_targets(y_t, NT), _pad_targets(z_t, MT)
        if col_mass is not None:
            # proportional to caption counts, with the rows' total (docs/math.md section
            # 1), decided without reading data so that a compiled step never branches on it
            col_mass = col_mass * (row_mass.sum() / col_mass.sum())
        dense = self._dense(X, Y)
        options = dict(n_iters=self.n_iters, weights=self.weights, backend=self.backend,
                       row_targets=y_t, col_targets=z_t, row_mass=row_mass,
                       col_mass=col_mass)
        several = self.positives != "first" and caption_to_video is not None
        bias_gradient = self.n_iters > 0 and (
            several if self.bias_gradient is None else self.bias_gradient)
        biases_only = queue is not None and not self.queue_as_negatives
        if several or bias_gradient or self.offset_penalty or biases_only:
            block = (N, Vb) if biases_only else (NT, MT)
            loss = self._loss_with_terms(x, y, X, Y, scale, dense, options, block,
                                         (y_t, z_t, counts) if several else None,
                                         bias_gradient)
        else:   # the biases are solved inside the loss op
            loss = embeddings_loss(X, Y, scale, NAMES, f=None, g=None, materialize=dense,
                                   memory_budget=None, **options)
        if queue is not None:
            self._enqueue_batch(x, y, row_mass, counts)
        return loss

    def _dense(self, X: Tensor, Y: Tensor) -> bool:
        """Whether to form the score matrix (``mode``; for "auto" the cost model)."""
        if self.mode != "auto":
            return self.mode == "dense"
        budget = self.stream_above * (8 if X.dtype == torch.float64 else 4)
        return M_.choose(None, budget, X, Y, passes=2 * self.n_iters + 1, backward=True)

    def _loss_with_terms(self, x, y, X, Y, scale, dense, options, block, several,
                         bias_gradient):
        """The biases solved here on the whole problem ``X, Y`` (queue included), the loss
        on ``block`` with them (the batch when the queue only shapes the biases, else
        everything), plus the optional terms of docs/training.md."""
        NT, MT = X.shape[0], Y.shape[0]
        nb, mb = block
        w_row, w_col = self.weights
        f, g = self._solve(X, Y, scale, dense, options["row_mass"], options["col_mass"])
        y_all, z_all = options["row_targets"], options["col_targets"]
        if y_all is None:
            y_all, z_all = V.default_targets(NT, MT, X.device)
        loss = embeddings_loss(X[:nb], Y[:mb], scale, NAMES, n_iters=0, weights=self.weights,
                               backend=self.backend, row_targets=y_all[:nb],
                               col_targets=z_all[:mb], f=f[:nb], g=g[:mb], row_mass=None,
                               col_mass=None, materialize=dense, memory_budget=None)
        weights_t = None
        if several is not None:   # every caption of a video is its positive
            N, Vb = x.shape[0], y.shape[0]
            c2v, z, counts = several[0][:N], several[1][:Vb], several[2]
            loss = loss + T.all_positives(x, y, scale, c2v, z, counts, f[:N], w_col,
                                          self.positives)
            a = T.positive_logits(x.detach(), y.detach(), T.detached(scale), c2v, f[:N])
            weights_t = T.target_weights(a, c2v, counts, self.positives)
            weights_t = torch.cat([weights_t, weights_t.new_zeros(nb - N)])
        if bias_gradient:
            loss = loss + T.own_bias_term(
                X, Y, scale, f, g, nb, mb, y_all, z_all, w_row, w_col,
                col_target_weights=weights_t, dense=dense,
                rows_per_chunk=max(1, self.stream_above // max(NT, MT)), backend=self.backend)
        if self.offset_penalty:
            rows = None if options["row_mass"] is None else options["row_mass"][:x.shape[0]]
            loss = loss + self.offset_penalty * T.offset_spread(x, y, scale, rows)
        return loss

    def _solve(self, X, Y, scale, dense, row_mass, col_mass):
        """Sinkhorn biases of the whole problem (detached); zeros for ``n_iters = 0``."""
        NT, MT = X.shape[0], Y.shape[0]
        if self.n_iters == 0:
            acc = torch.float64 if X.dtype == torch.float64 else torch.float32
            f = X.new_zeros(NT, dtype=acc)
            if row_mass is not None:   # a caption without mass takes no part
                f = torch.where(row_mass > 0, f, float("-inf"))
            return f, f.new_zeros(MT)
        sol = embeddings_solution(X.detach(), Y.detach(), T.detached(scale), NAMES,
                                  row_mass=row_mass, col_mass=col_mass, n_iters=self.n_iters,
                                  tol=None, check_every=1, init_g=None, backend=self.backend,
                                  strict=False, materialize=dense, memory_budget=None)
        return sol.f, sol.g

    def extra_repr(self) -> str:
        return (f"n_iters={self.n_iters}, weights={self.weights}, mode={self.mode!r}, "
                f"queue_size={self.queue_size}, queue_as_negatives={self.queue_as_negatives}, "
                f"positives={self.positives!r}, bias_gradient={self.bias_gradient}, "
                f"offset_penalty={self.offset_penalty}")
