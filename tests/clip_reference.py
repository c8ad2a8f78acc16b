"""References for NCLClipLoss: open_clip's own ClipLoss, and ClipLoss's math written out.

open_clip's package imports torchvision, which may not import beside a given torch build
(PyPI's torchvision against the CPU torch wheel, for instance); its ``open_clip/loss.py``
needs only torch, so when the package is installed but does not import, that one file is
loaded on its own. ``hand_written`` restates ClipLoss (open_clip 3.3, ``open_clip/loss.py``)
for machines without open_clip: the same gathers and the same cross-entropies.
"""

import importlib.util
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


def open_clip_loss_class():
    """open_clip's ``ClipLoss``, or None when open_clip is not installed."""
    try:
        import open_clip
        return open_clip.ClipLoss
    except Exception:  # not installed, or its imports (torchvision) fail
        pass
    try:
        spec = importlib.util.find_spec("open_clip")   # finds the package, runs nothing
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    if not path.is_file():
        return None
    file_spec = importlib.util.spec_from_file_location("_open_clip_loss_alone", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.ClipLoss


class HandWrittenClipLoss(torch.nn.Module):
    """ClipLoss's math: gather (with or without autograd; without it, a rank's own
    features are put back in place unless local_loss), logits, labels, two cross-entropies."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1):
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def _gather(self, t):
        if self.gather_with_grad:
            from torch.distributed.nn import all_gather
            return torch.cat(all_gather(t))
        parts = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        if not self.local_loss:
            parts[self.rank] = t
        return torch.cat(parts)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict=False):
        img, txt = image_features, text_features
        if self.world_size > 1:
            all_img, all_txt = self._gather(img), self._gather(txt)
            if self.local_loss:
                per_image = logit_scale * img @ all_txt.T
                per_text = logit_scale * txt @ all_img.T
            else:
                per_image = logit_scale * all_img @ all_txt.T
                per_text = per_image.T
        else:
            per_image = logit_scale * img @ txt.T
            per_text = logit_scale * txt @ img.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        labels = torch.arange(per_image.shape[0], device=img.device)
        if self.world_size > 1 and self.local_loss:
            labels = labels + per_image.shape[0] * self.rank
        loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


def references():
    """{name: ClipLoss class} of every reference available here."""
    found = {"hand_written": HandWrittenClipLoss}
    oc = open_clip_loss_class()
    if oc is not None:
        found["open_clip"] = oc
    return found
