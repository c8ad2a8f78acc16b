"""Small helpers shared by the oracle modules (input conversion and checks)."""

import math

import torch


def scale_value(scale):
    """The value of ``scale`` (Python float or 0-dim tensor) as a float; must be finite and > 0 (docs/math.md section 1)."""
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale must be a Python number or a 0-dim tensor, got shape {tuple(scale.shape)}")
        value = float(scale.detach().item())
    else:
        value = float(scale)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"scale must be finite and > 0, got {value}")
    return value


def scale_tensor(scale, dtype, device):
    """``scale`` as a 0-dim tensor in ``dtype``; a tensor keeps its autograd graph."""
    scale_value(scale)  # validation only
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=dtype)
    return torch.tensor(float(scale), dtype=dtype, device=device)


def check_matrix(x, name):
    """A 2-D floating tensor without NaN or +inf (``-inf`` is a mask, docs/math.md section 5)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if torch.isposinf(x).any():
        raise ValueError(f"{name} contains +inf")


def check_vector(v, length, name, dtype, device, allow_neginf=True):
    """``v`` as a 1-D tensor of ``length`` in ``dtype``; NaN and +inf rejected."""
    v = torch.as_tensor(v, device=device).detach().to(dtype)
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(v.shape)}")
    if torch.isnan(v).any() or torch.isposinf(v).any():
        raise ValueError(f"{name} contains NaN or +inf")
    if not allow_neginf and torch.isneginf(v).any():
        raise ValueError(f"{name} contains -inf")
    return v


def masked_logits(S, s):
    """``L = s * S`` with ``-inf`` entries kept as ``-inf`` masks.

    Written so that autograd gives exactly 0 (not ``0 * -inf = NaN``) to ``S`` and ``s`` at
    masked entries: the convention for dloss/ds = sum G_ij S_ij is that masked terms are 0.
    """
    mask = torch.isneginf(S)
    S_finite = torch.where(mask, torch.zeros((), dtype=S.dtype, device=S.device), S)
    return torch.where(mask, torch.full((), -math.inf, dtype=S.dtype, device=S.device), s * S_finite)
