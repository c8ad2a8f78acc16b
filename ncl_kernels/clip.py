"""``NCLClipLoss``: open_clip's ``ClipLoss`` interface, computing the NCL loss.

open_clip's training loop calls ``loss(**model_out, output_dict=True)`` with
``image_features``, ``text_features``, ``logit_scale`` (already exponentiated) and, for
models that have one, ``logit_bias``. :class:`NCLClipLoss` takes exactly those, and the
constructor of ``ClipLoss`` (``local_loss``, ``gather_with_grad``, ``cache_labels``,
``rank``, ``world_size``, ``use_horovod``) plus the NCL options, so that swapping the loss
is one line. At ``n_iters=0`` it is ``ClipLoss``: the same value and the same gradients
on every rank, in each of open_clip's four distributed modes.
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import _validate as V, distributed as D
from ._types import Scale, Weights
from .loss import ncl_loss_embeddings
from .nn import NCLLoss

Tensor = torch.Tensor
NAMES = ("image_features", "text_features")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-size slices whose backward sums every rank's gradient of this
    rank's slice (a reduce-scatter), as open_clip's ``gather_with_grad=True`` gathers."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        world = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), t.shape[0]
        return D._gather_rows(t.detach(), [t.shape[0]] * world, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        start = ctx.rank * ctx.n
        return D._all_sum(grad.contiguous(), ctx.group)[start:start + ctx.n], None


def _gather(t: Tensor, with_grad: bool, group) -> Tensor:
    """open_clip's ``gather_features`` for ``local_loss=True``: the rank-ordered concat of
    every rank's ``t``, through autograd or without any gradient."""
    if with_grad:
        return _GatherWithGrad.apply(t, group)
    return D._gather_rows(t.detach(), [t.shape[0]] * dist.get_world_size(group), group)


class NCLClipLoss(nn.Module):
    """open_clip's ``ClipLoss``, with the NCL biases (docs/math.md section 3).

    Rows are images, columns texts: ``weights = (w_image_to_text, w_text_to_image)``.
    With ``n_iters=0`` the loss is open_clip's symmetric InfoNCE exactly; with
    ``n_iters > 0`` (default 20, as :class:`NCLLoss`: docs/training.md) the logits of both
    directions carry the instance-wise biases of ``n_iters`` Sinkhorn iterations over the
    *global* batch (all ranks).

    ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)``: N image-text pairs per rank; ``logit_scale`` is the multiplier
    (``model.logit_scale.exp()``, as open_clip's models return it), a number or a 0-dim
    tensor. ``output_dict=True`` returns ``{"contrastive_loss": loss}``.

    ``logit_bias`` (SigLIP-style models return one): ``ClipLoss`` adds it to every logit.
    A constant added to every logit changes neither a softmax nor the Sinkhorn biases'
    effect (the row and column terms of the loss each subtract a logit from a
    log-sum-exp of logits), so it changes neither the loss nor any gradient, here as in
    ``ClipLoss``. It is accepted (a number or a one-element tensor) and checked finite; a
    tensor that requires grad is joined to the loss with an exact zero gradient, so that
    DistributedDataParallel sees the parameter used.

    Distributed modes (``world_size > 1``: a ``torch.distributed`` group of that size must
    be initialized, ``rank`` this process's rank in it; ``group`` defaults to the world):

    * ``local_loss=False``: every rank returns the loss of the global batch, computed by
      :class:`ncl_kernels.distributed.DistributedNCLLoss` (each rank streams its own rows
      against the gathered columns: 1/world_size of the work ``ClipLoss`` does per rank).
      Gradients follow ``ClipLoss``: with ``gather_with_grad=True`` the local features
      receive ``world_size * d(global loss)/d(local features)``, with ``False``
      ``d(global loss)/d(local features)``; ``logit_scale`` receives the full
      ``d(global loss)/d(logit_scale)`` on every rank either way.
    * ``local_loss=True``: each rank's loss has only its own rows' terms (its images
      against all texts, its texts against all images, with the biases of the global
      problem), gathered as ``ClipLoss`` gathers them (``gather_with_grad``: through
      autograd, else without gradient); local batches must have one size on every rank.

    Args:
        local_loss, gather_with_grad, rank, world_size: as in ``ClipLoss`` (above).
        cache_labels: accepted for ``ClipLoss``'s signature; targets are built each call
            (they are a few integers), so it changes nothing.
        use_horovod: must be False (Horovod is not supported).
        n_iters, weights: the NCL biases and the direction weights.
        queue_size, embed_dim: a queue of earlier embeddings, kept per rank when
            distributed (see :class:`DistributedNCLLoss`), whose entries are negatives
            (``queue_as_negatives=True``, without :class:`NCLLoss`'s drift terms, on one
            process as on several); not with ``local_loss``. Without a momentum encoder
            such a queue cost retrieval in our measurements (docs/training.md): for
            training with a queue on one process, :class:`NCLLoss`'s biases-only queue
            is the recommended form.
        mode: ``world_size == 1`` only: :class:`NCLLoss`'s dense/streaming choice.
        group: the process group (default: the world).
        backend: see :func:`ncl_kernels.backends`.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, n_iters: int = 20,
                 weights: Weights = (0.5, 0.5), queue_size: int = 0,
                 embed_dim: Optional[int] = None, mode: str = "auto",
                 group: Optional[dist.ProcessGroup] = None, backend: str = "auto") -> None:
        super().__init__()
        self.local_loss = V.flag("local_loss", local_loss)
        self.gather_with_grad = V.flag("gather_with_grad", gather_with_grad)
        self.cache_labels = V.flag("cache_labels", cache_labels)
        if V.flag("use_horovod", use_horovod):
            raise ValueError("NCLClipLoss does not support Horovod (use_horovod=True); use "
                             "torch.distributed")
        self.world_size = V.positive_int("world_size", world_size)
        self.rank = V.count("rank", rank)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}); got {rank}")
        V.iterations(n_iters, None, 1)
        self.n_iters, self.weights = n_iters, V.weights(weights)
        if self.local_loss and queue_size:
            raise ValueError("queue_size > 0 needs local_loss=False (a queue takes part in "
                             "the global problem)")
        self.group, self.backend = group, backend
        self.inner: Optional[nn.Module] = None
        if self.world_size == 1:
            # the distributed module's queue and targets, so that one process and several
            # compute the same loss
            self.inner = NCLLoss(n_iters, weights, queue_size=queue_size, embed_dim=embed_dim,
                                 mode=mode, backend=backend, queue_as_negatives=True,
                                 positives="first", bias_gradient=False, offset_penalty=0.0)
        elif not self.local_loss:
            self.inner = D.DistributedNCLLoss(
                n_iters, weights, queue_size=queue_size, embed_dim=embed_dim,
                gradients="open_clip" if self.gather_with_grad else "global", group=group,
                backend=backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scale,
                logit_bias: Optional[Scale] = None, output_dict: bool = False
                ) -> Union[Tensor, Dict[str, Tensor]]:
        group = None
        if self.world_size > 1:
            D._check_group()
            group = dist.group.WORLD if self.group is None else self.group
        error = None
        try:  # every check of this rank's inputs, before any collective
            x, y = self._checked(image_features, text_features, logit_bias, group)
        except (TypeError, ValueError) as exc:
            error = exc
        if group is not None and not torch.compiler.is_compiling():
            D._agree(error, image_features.device if isinstance(image_features, Tensor)
                     else torch.device("cpu"), group)
        if error is not None:
            raise error
        if self.world_size == 1:
            loss = self.inner(x, y, logit_scale)
        elif not self.local_loss:
            if not self.gather_with_grad:  # ClipLoss: the full d/dscale on every rank
                logit_scale = D.sum_gradient_over_ranks(logit_scale, group)
            loss = self.inner(x, y, logit_scale)
        else:
            loss = self._local(x, y, logit_scale, group)
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            loss = loss + (logit_bias * 0).sum().to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _checked(self, image_features, text_features, logit_bias, group
                 ) -> Tuple[Tensor, Tensor]:
        x, y = V.embeddings_meta(image_features, text_features, NAMES)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"image_features and text_features must hold the same number "
                             f"of pairs; got {x.shape[0]} and {y.shape[0]}")
        if not torch.compiler.is_compiling():  # (inside the ops, the checks name rows and
            V.finite(NAMES[0], x)              # columns by NCLLoss's names)
            V.finite(NAMES[1], y)
        if group is not None:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            if (world, rank) != (self.world_size, self.rank):
                raise ValueError(f"NCLClipLoss(rank={self.rank}, world_size="
                                 f"{self.world_size}) but this process is rank {rank} of "
                                 f"a group of {world}")
        if logit_bias is not None:
            if isinstance(logit_bias, Tensor):
                if logit_bias.numel() != 1 or not logit_bias.is_floating_point():
                    raise ValueError(f"logit_bias must be a number or a one-element floating "
                                     f"tensor; got shape {tuple(logit_bias.shape)}, "
                                     f"{logit_bias.dtype}")
                finite = torch.compiler.is_compiling() or bool(torch.isfinite(logit_bias).all())
            elif isinstance(logit_bias, numbers.Real) and not isinstance(logit_bias, bool):
                finite = abs(float(logit_bias)) < float("inf")
            else:
                raise TypeError(f"logit_bias must be a number or a one-element tensor; got "
                                f"{type(logit_bias).__name__}")
            if not finite:
                raise ValueError(f"logit_bias must be finite; got {logit_bias}")
        return x, y

    def _local(self, x: Tensor, y: Tensor, scale, group) -> Tensor:
        """``local_loss=True``: this rank's images against every text and its texts
        against every image, with the biases of the global problem."""
        n = x.shape[0]
        sizes = D._sizes(n, n, x.device, group)
        if any(s != [n, n] for s in sizes):
            raise ValueError(f"local_loss=True needs one local batch size on every rank; "
                             f"got {[s[0] for s in sizes]}")
        all_x, all_y = _gather(x, self.gather_with_grad, group), \
            _gather(y, self.gather_with_grad, group)
        start = n * self.rank
        f_x = g_y = f_all = g_all = None
        if self.n_iters:
            f_x, g_all = D.global_biases(x, y, scale, group=group, n_iters=self.n_iters,
                                         backend=self.backend)
            f_all = D._gather_rows(f_x, [n] * self.world_size, group)
            g_y = g_all[start:start + n]
        own = torch.arange(start, start + n, device=x.device)
        w_row, w_col = self.weights
        # (an empty target set counts 0: each call adds one direction's terms)
        none_x = torch.full((all_x.shape[0],), -1, dtype=torch.int64, device=x.device)
        image_to_text = ncl_loss_embeddings(x, all_y, scale, row_targets=own,
                                            col_targets=none_x, n_iters=0, f=f_x, g=g_all,
                                            weights=(w_row, 0.0), backend=self.backend)
        text_to_image = ncl_loss_embeddings(y, all_x, scale, row_targets=own,
                                            col_targets=none_x, n_iters=0, f=g_y, g=f_all,
                                            weights=(w_col, 0.0), backend=self.backend)
        return image_to_text + text_to_image

    def extra_repr(self) -> str:
        return (f"n_iters={self.n_iters}, weights={self.weights}, local_loss={self.local_loss}, "
                f"gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}")

