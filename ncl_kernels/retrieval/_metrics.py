"""Recall@K, median and mean rank (SPEC.md section 4), and a small text table."""

from __future__ import annotations

import numpy as np
import torch

RECALL_AT = (1, 5, 10, 50)
KEYS = tuple(f"R@{k}" for k in RECALL_AT) + ("MdR", "MnR")


def metrics(ranks: torch.Tensor) -> dict[str, float]:
    """``R@1, R@5, R@10, R@50`` (percent), ``MdR`` (numpy median: the mean of the two
    middle ranks for an even count) and ``MnR``, as Python floats."""
    if not isinstance(ranks, torch.Tensor) or ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError("ranks must be a non-empty 1-D tensor")
    if ranks.is_floating_point() or ranks.is_complex() or ranks.dtype == torch.bool:
        raise TypeError(f"ranks must be an integer tensor; got {ranks.dtype}")
    r = ranks.detach().cpu().to(torch.float64).numpy()
    if (r < 1).any():
        raise ValueError("ranks start at 1")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_AT}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def format_metrics(table: dict[str, dict[str, float]]) -> str:
    """A small aligned text table: one row per entry of ``table`` (name -> metrics)."""
    width = max([len("method")] + [len(name) for name in table])
    lines = [f"{'method':<{width}} " + " ".join(f"{k:>7}" for k in KEYS)]
    for name, m in table.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{m[k]:7.2f}" for k in KEYS))
    return "\n".join(lines)
