"""Recall@K, median and mean rank (docs/math.md section 4), and a small text table."""

from __future__ import annotations

import numbers
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np
import torch

RECALL_AT = (1, 5, 10, 50)
KEYS = tuple(f"R@{k}" for k in RECALL_AT) + ("MdR", "MnR")


def _recall_levels(ks) -> Tuple[int, ...]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise TypeError(f"ks must be a sequence of positive integers; got {ks!r}")
    ks = tuple(ks)
    if not ks or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool)
                         and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers; got {ks!r}")
    return tuple(int(k) for k in ks)


def metrics(ranks: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> Dict[str, float]:
    """``R@k`` for every ``k`` of ``ks`` (percent; default R@1, R@5, R@10, R@50), ``MdR``
    (numpy median: the mean of the two middle ranks for an even count) and ``MnR``, as
    Python floats, in that order."""
    ks = _recall_levels(ks)
    if not isinstance(ranks, torch.Tensor) or ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError("ranks must be a non-empty 1-D tensor")
    if ranks.is_floating_point() or ranks.is_complex() or ranks.dtype == torch.bool:
        raise TypeError(f"ranks must be an integer tensor; got {ranks.dtype}")
    r = ranks.detach().cpu().to(torch.float64).numpy()
    if (r < 1).any():
        raise ValueError("ranks start at 1")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def format_metrics(table: Dict[str, Dict[str, float]]) -> str:
    """A small aligned text table: one row per entry of ``table`` (name -> the dict of
    :func:`metrics`); every entry must hold the same keys as the first."""
    if not isinstance(table, dict) or not table:
        raise ValueError("format_metrics takes a non-empty dict {name: metrics}")
    keys = None
    for name, m in table.items():
        if not isinstance(m, dict):
            raise TypeError(f"format_metrics: entry {name!r} must be a dict of metrics; got "
                            f"{type(m).__name__}")
        keys = list(m) if keys is None else keys
        missing = [k for k in keys if k not in m]
        if missing:
            raise ValueError(f"format_metrics: entry {name!r} lacks {', '.join(missing)} "
                             f"(every entry needs the keys of the first: {', '.join(keys)})")
    width = max([len("method")] + [len(str(name)) for name in table])
    lines = [f"{'method':<{width}} " + " ".join(f"{k:>7}" for k in keys)]
    for name, m in table.items():
        lines.append(f"{str(name):<{width}} " + " ".join(f"{m[k]:7.2f}" for k in keys))
    return "\n".join(lines)
