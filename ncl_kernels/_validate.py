"""Every argument check of the public API, in one place, before any kernel runs.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape or value) with a message naming the argument, what was expected and what was given.
Checks that look at tensor values (NaN, +inf, ranges) cost one reduction each; on CUDA
tensors that is one host synchronization per check.

Checks come in two kinds, so that ``torch.compile`` can trace the loss without graph
breaks: ``*_meta`` checks read only metadata (type, shape, dtype, device, strides) and run
in traced Python; ``*_values`` checks read tensor data and run inside the custom ops of
``ncl_kernels.ops`` (before any kernel there). The plain names (``scores``,
``embeddings``, ``scale``, ...) run both, for the eager-only entry points.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

from ._dtypes import STORAGE_DTYPES, acc_dtype

Tensor = torch.Tensor
INF = float("inf")
MASS_RTOL = 1e-5


def _describe(x) -> str:
    """What ``x`` is, in a few words (never a dump of a large array)."""
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    shape = getattr(x, "shape", None)
    if shape is not None:  # numpy arrays and the like
        return f"a {type(x).__module__}.{type(x).__name__} of shape {tuple(shape)}"
    text = repr(x)
    return f"{type(x).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {_describe(x)}")
    return x


def _storage(name: str, x: Tensor) -> None:
    if x.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16; got {x.dtype}")


def scores(S, name: str = "scores") -> Tensor:
    """A 2-D score matrix: non-empty, unit column stride, no NaN or +inf (-inf is a mask)."""
    return scores_values(scores_meta(S, name), name)


def scores_meta(S, name: str = "scores") -> Tensor:
    """The metadata half of :func:`scores` (no data is read)."""
    S = _tensor(name, S)
    if S.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N x M); got shape {tuple(S.shape)}")
    _storage(name, S)
    n, m = S.shape
    if n == 0 or m == 0:
        raise ValueError(f"{name} must have at least one row and one column; got shape "
                         f"{(n, m)}")
    if m > 1 and S.stride(1) != 1:
        raise ValueError(f"{name} must have column stride 1 (rows may be strided); got "
                         f"strides {S.stride()} — pass .contiguous()")
    return S


def scores_values(S: Tensor, name: str = "scores", scale: Optional[float] = None) -> Tensor:
    """The data half of :func:`scores`: no NaN, no +inf, and (given the scale's value)
    logits ``scale * S`` that fit the accumulation dtype."""
    top = float(S.max())  # one read: NaN propagates through max, +inf is the max
    if math.isnan(top):
        raise ValueError(f"{name} contains NaN")
    if top == INF:
        if "@" in name:  # a product of finite embeddings (checked before) overflowed
            raise ValueError(f"{name} overflows {S.dtype}: the embeddings are finite but "
                             f"their products are not; normalize them")
        raise ValueError(f"{name} contains +inf (-inf is allowed as a mask)")
    acc = acc_dtype(S.dtype)
    if scale is not None and scale * top > torch.finfo(acc).max:
        raise ValueError(f"the logits scale * {name} overflow {acc}: scale = {scale:g} times "
                         f"the largest score {top:g} exceeds {torch.finfo(acc).max:.3g}; lower "
                         f"the scale or normalize the scores")
    return S


def biased_scores_fit(S: Tensor, scale: float, f: Optional[Tensor],
                      g: Optional[Tensor], name: str = "scores") -> None:
    """The data check of ``apply_biases_``: no NaN or +inf in ``S``, and every result of
    ``scale * S + f_i + g_j`` within the storage dtype's range (one pass over ``S``)."""
    low, top = (float(v) for v in torch.aminmax(S))  # NaN propagates into both
    if math.isnan(top):
        raise ValueError(f"{name} contains NaN")
    if top == INF:
        raise ValueError(f"{name} contains +inf (-inf is allowed as a mask)")
    limit = torch.finfo(S.dtype).max

    def extreme(v, pick):
        finite = None if v is None else v[torch.isfinite(v)]
        return 0.0 if finite is None or finite.numel() == 0 else float(pick(finite))

    high = scale * top + extreme(f, torch.max) + extreme(g, torch.max)
    deep = scale * low + extreme(f, torch.min) + extreme(g, torch.min)
    if high > limit or (low != -INF and deep < -limit):
        raise ValueError(f"apply_biases_ would overflow {S.dtype}: scale * {name} + f + g "
                         f"reaches {high if high > limit else deep:.3g} (the limit is "
                         f"{limit:.3g}); use a wider dtype or a smaller scale")


def embeddings(x, y, names: Tuple[str, str] = ("x", "y")) -> Tuple[Tensor, Tensor]:
    """Query and item embeddings: 2-D, same D, dtype and device, finite.

    ``names`` are the caller's argument names, used in the messages.
    """
    return embeddings_values(*embeddings_meta(x, y, names), names)


def embeddings_meta(x, y, names: Tuple[str, str] = ("x", "y")) -> Tuple[Tensor, Tensor]:
    """The metadata half of :func:`embeddings`."""
    nx, ny = names
    for name, t in ((nx, x), (ny, y)):
        t = _tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows x D); got shape {tuple(t.shape)}")
        _storage(name, t)
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must have at least one row and one feature; got "
                             f"shape {tuple(t.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{nx} and {ny} must have the same embedding size D; got {nx} "
                         f"{tuple(x.shape)} and {ny} {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"{nx} and {ny} must have the same dtype; got {x.dtype} and "
                        f"{y.dtype}")
    same_device(**{nx: x, ny: y})
    return x, y


def embeddings_values(x: Tensor, y: Tensor,
                      names: Tuple[str, str] = ("x", "y")) -> Tuple[Tensor, Tensor]:
    """The data half of :func:`embeddings`: every entry finite."""
    for name, t in zip(names, (x, y)):
        finite(name, t)
    return x, y


def finite(name: str, t: Tensor) -> Tensor:
    """Every entry of ``t`` finite; the message says whether NaN or inf was found."""
    if not bool(torch.isfinite(t).all()):
        found = "NaN" if bool(torch.isnan(t).any()) else "inf"
        raise ValueError(f"{name} contains {found} (embeddings must be finite)")
    return t


def unaliased(t: Optional[Tensor], written: Tensor) -> Optional[Tensor]:
    """``t``, or a copy of it when it shares memory with ``written`` (a tensor an in-place
    op is about to overwrite): the op must read the caller's values, not its own output."""
    if t is None or t.untyped_storage().data_ptr() != written.untyped_storage().data_ptr():
        return t
    return t.clone()


def writable(S: Tensor, name: str = "scores") -> Tensor:
    """An in-place target: its elements must not overlap (an expanded tensor, a row stride
    below the row length): where two of them share memory a write is ambiguous."""
    n, m = S.shape
    # 2-D with unit column stride (scores_meta): rows overlap when closer than a row apart
    if (n > 1 and S.stride(0) < m) or (m > 1 and S.stride(1) == 0):
        raise ValueError(f"{name} cannot be written in place: its elements overlap in memory "
                         f"(strides {tuple(S.stride())} for shape {tuple(S.shape)}, e.g. an "
                         f"expanded tensor); pass {name}.contiguous()")
    return S


def not_a_leaf_view(S: Tensor, name: str = "scores") -> Tensor:
    """A tensor whose storage an op will overwrite must not be a view of a leaf that
    requires grad (a parameter): PyTorch refuses such in-place writes too."""
    base = S._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError(f"{name} is a view of a leaf tensor that requires grad (a "
                         f"parameter, say): inplace_backward=True would overwrite that "
                         f"leaf's values with the gradient; pass {name}.clone() or "
                         f"inplace_backward=False")
    return S


def same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             f"all tensors must be on one device")


def scale(value) -> float:
    """``scale > 0``: a Python number or a 0-dim floating tensor (returned as a float)."""
    return scale_value(*scale_meta(value))


def scale_meta(value, like: Optional[Tensor] = None) -> Tuple[Optional[Tensor], float]:
    """The metadata half of :func:`scale`: ``(tensor, 0.0)`` or ``(None, number)``.

    A Python number is checked completely here (it is a constant under tracing). A tensor
    must live on ``like``'s device, or be a CPU tensor (as PyTorch allows for scalars).
    """
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"scale must be a number or a 0-dim floating tensor; got "
                            f"{_describe(value)}")
        if like is not None and value.device != like.device and value.device.type != "cpu":
            raise ValueError(f"scale is on {value.device} but the scores are on "
                             f"{like.device}; pass a number, a CPU tensor or a tensor on "
                             f"{like.device}")
        return value, 0.0
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return None, scale_value(None, float(value))
    raise TypeError(f"scale must be a number or a 0-dim floating tensor; got "
                    f"{_describe(value)}")


def scale_value(tensor: Optional[Tensor], number: float) -> float:
    """The data half of :func:`scale`: the value as a float, finite and > 0."""
    if tensor is not None:
        number = float(tensor.detach())
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"scale must be finite and > 0; got {number}")
    return number


def iterations(n_iters, tol, check_every) -> None:
    if not isinstance(n_iters, numbers.Integral) or isinstance(n_iters, bool) or n_iters < 0:
        raise ValueError(f"n_iters must be an integer >= 0; got {n_iters!r}")
    if tol is not None:
        if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not (
                math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be None or a finite number > 0; got {tol!r}")
    if (not isinstance(check_every, numbers.Integral) or isinstance(check_every, bool)
            or check_every < 1):
        raise ValueError(f"check_every must be an integer >= 1; got {check_every!r}")


def mass_meta(name: str, value, length: int, like: Tensor) -> Tensor:
    """A mass vector on ``like``'s device, in its own floating dtype (the data check
    converts it to the accumulation dtype once it knows the values fit)."""
    if isinstance(value, Tensor):
        t = value
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a 1-D tensor or a sequence of numbers; got "
                        f"{_describe(value)}")
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a 1-D tensor or a sequence of numbers; got "
                            f"{_describe(value)}") from None
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D tensor of length {length}; got shape "
                         f"{tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor; got {t.dtype}")
    if isinstance(value, Tensor):
        same_device(**{name: value, "scores": like})
    wide = torch.float64 if t.dtype == torch.float64 else acc_dtype(like.dtype)
    return t.detach().to(device=like.device, dtype=wide)


def mass_values(name: str, t: Tensor, acc: Optional[torch.dtype] = None) -> Tensor:
    """The data check of a mass vector: finite, >= 0, a positive total, and (converted to
    ``acc``, default: its own dtype) representable there."""
    if not bool(torch.isfinite(t).all()):
        found = "NaN" if bool(torch.isnan(t).any()) else "inf"
        raise ValueError(f"{name} contains {found}")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0; its smallest entry is {float(t.min())}")
    if not float(t.sum()) > 0:
        raise ValueError(f"{name} must have a positive total; got all zeros")
    if acc is not None and t.dtype != acc:
        limit = torch.finfo(acc).max
        if float(t.max()) > limit or float(t.sum()) > limit:
            raise ValueError(f"{name} does not fit {acc}, the accumulation dtype of these "
                             f"scores: its largest entry is {float(t.max()):.3g} and its "
                             f"total {float(t.sum()):.3g} (at most {limit:.3g}); rescale it")
        t = t.to(acc)
    return t


def masses(row_mass, col_mass, n: int, m: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    """Row and column masses with docs/math.md section 1's defaults and total rule."""
    return masses_values(*masses_meta(row_mass, col_mass, n, m, like), n, m, like)


def masses_meta(row_mass, col_mass, n: int, m: int, like: Tensor):
    """The metadata half of :func:`masses`: given masses as accumulation-dtype tensors
    on ``like``'s device (``None`` stays ``None``)."""
    r = None if row_mass is None else mass_meta("row_mass", row_mass, n, like)
    c = None if col_mass is None else mass_meta("col_mass", col_mass, m, like)
    return r, c


def masses_values(r: Optional[Tensor], c: Optional[Tensor], n: int, m: int,
                  like: Tensor) -> Tuple[Tensor, Tensor]:
    """The data half of :func:`masses`: value checks, defaults and the total rule."""
    dt, dev = acc_dtype(like.dtype), like.device
    r = None if r is None else mass_values("row_mass", r, dt)
    c = None if c is None else mass_values("col_mass", c, dt)
    if r is None and c is None:
        r = torch.ones(n, dtype=dt, device=dev)
    if r is None:
        r = torch.full((n,), float(c.sum()) / n, dtype=dt, device=dev)
    if c is None:
        c = torch.full((m,), float(r.sum()) / m, dtype=dt, device=dev)
    tr, tc = float(r.sum()), float(c.sum())
    if abs(tr - tc) > MASS_RTOL * max(tr, tc):
        raise ValueError(f"row_mass and col_mass must have the same total (to {MASS_RTOL:g} "
                         f"relative); got {tr:.9g} and {tc:.9g}")
    return r, c


def potential(name: str, value, length: int, like: Tensor) -> Optional[Tensor]:
    """A potential (``f``, ``g``, ``init_g``): 1-D, no NaN or +inf (-inf = removed)."""
    return potential_values(name, potential_meta(name, value, length, like),
                            acc_dtype(like.dtype))


def potential_meta(name: str, value, length: int, like: Tensor) -> Optional[Tensor]:
    """The metadata half of :func:`potential` (returns the tensor as given)."""
    if value is None:
        return None
    t = _tensor(name, value)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D tensor of length {length}; got shape "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {t.dtype}")
    same_device(**{name: t, "scores": like})
    return t


def potential_values(name: str, t: Optional[Tensor], acc=None) -> Optional[Tensor]:
    """The data half of :func:`potential`: a detached contiguous copy in the
    accumulation dtype ``acc`` (default: keep the dtype), no NaN, no +inf."""
    if t is None:
        return None
    t = t.detach().to(acc or t.dtype).contiguous()
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
    if bool((t == INF).any()):
        raise ValueError(f"{name} contains +inf")
    return t


def default_targets(n: int, m: int, device) -> Tuple[Tensor, Tensor]:
    """docs/math.md section 3: ``y_i = i`` and ``z_j = j`` below ``min(N, M)``, ``-1`` beyond."""
    k = min(n, m)
    y = torch.full((n,), -1, dtype=torch.int64, device=device)
    z = torch.full((m,), -1, dtype=torch.int64, device=device)
    y[:k] = torch.arange(k, device=device)
    z[:k] = torch.arange(k, device=device)
    return y, z


def _target(name: str, value, length: int, upper: int, other: str, like: Tensor) -> Tensor:
    return target_values(name, target_meta(name, value, length, like), upper, other)


def target_meta(name: str, value, length: int, like: Tensor) -> Tensor:
    t = _tensor(name, value)
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor; got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D tensor of length {length}; got shape "
                         f"{tuple(t.shape)}")
    same_device(**{name: t, "scores": like})
    return t


def target_values(name: str, t: Tensor, upper: int, other: str) -> Tensor:
    if t.shape[0] and bool(((t < -1) | (t >= upper)).any()):
        bad = t[(t < -1) | (t >= upper)][0].item()
        raise ValueError(f"{name} must hold {other} indices in [0, {upper}) or -1 (no loss "
                         f"term); got {bad}")
    return t


def targets_meta(row_targets, col_targets, n: int, m: int, like: Tensor):
    """The metadata half of :func:`targets` (``None`` stays ``None``: the default)."""
    y = None if row_targets is None else target_meta("row_targets", row_targets, n, like)
    z = None if col_targets is None else target_meta("col_targets", col_targets, m, like)
    return y, z


def targets_values(y: Optional[Tensor], z: Optional[Tensor], n: int, m: int,
                   device) -> Tuple[Tensor, Tensor]:
    """The data half of :func:`targets`: range checks, and the defaults for ``None``."""
    y_def, z_def = default_targets(n, m, device)
    y = y_def if y is None else target_values("row_targets", y, m, "column")
    z = z_def if z is None else target_values("col_targets", z, n, "row")
    return y, z


def targets_unmasked(t_row: Tensor, t_col: Tensor, y: Tensor, z: Tensor) -> None:
    """A target on a masked (``-inf``) score would make the loss infinite: refuse it.

    ``t_row``/``t_col`` are the targets' logits, ``y``/``z`` the targets (-1: none).
    """
    for name, t, idx, what, other in (("row_targets", t_row, y, "row", "column"),
                                      ("col_targets", t_col, z, "column", "row")):
        bad = (idx >= 0) & (t == -math.inf)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: {what} {i}'s target {other} {int(idx[i])} has a "
                             f"masked (-inf) score, so its loss term would be infinite; "
                             f"unmask it or set the target to -1")


def targets(row_targets, col_targets, n: int, m: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    return targets_values(*targets_meta(row_targets, col_targets, n, m, like), n, m,
                          like.device)


def weights(value: Sequence[float]) -> Tuple[float, float]:
    if isinstance(value, (str, bytes)):  # "12" would unpack into two numbers
        raise TypeError(f"weights must be a pair of numbers (w_row, w_col); got "
                        f"{_describe(value)}")
    try:
        w_row, w_col = (float(w) for w in value)
    except (TypeError, ValueError):
        raise TypeError(f"weights must be a pair of numbers (w_row, w_col); got "
                        f"{value!r}") from None
    if not all(math.isfinite(w) and w >= 0 for w in (w_row, w_col)):
        raise ValueError(f"weights must be finite and >= 0; got {value!r}")
    return w_row, w_col


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


# -- retrieval (ncl_kernels.retrieval) ------------------------------------------------------

def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}; got {value!r}")
    return value


def count(name: str, value) -> int:
    """An integer >= 0 (``bool`` is refused: it is not a count)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def topk_k(k, m: int) -> int:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= m:
        raise ValueError(f"k must be an integer in [1, {m}] (the gallery size); got {k!r}")
    return int(k)


def retrieval_targets(targets, n_q: int, m: int, device) -> Tensor:
    """Positives of each query: (Q,) or (Q, P) int64 gallery indices, -1 = padding.

    Returned as (Q, P) on ``device``; every row needs at least one index that is not -1.
    """
    t = _tensor("targets", targets)
    if t.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor; got {t.dtype}")
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != n_q or t.shape[1] == 0:
        raise ValueError(f"targets must have shape ({n_q},) or ({n_q}, P) with P >= 1; got "
                         f"{tuple(targets.shape)}")
    same_device(targets=t, queries=torch.empty(0, device=device))
    bad = (t < -1) | (t >= m)
    if bool(bad.any()):
        raise ValueError(f"targets must be gallery indices in [0, {m}) or -1 (padding); got "
                         f"{int(t[bad][0])}")
    if bool((t < 0).all(1).any()):
        row = int((t < 0).all(1).nonzero()[0, 0])
        raise ValueError(f"every query needs at least one target that is not -1; row {row} "
                         f"has none")
    return t


def caption_index(caption_to_video, n_videos=None) -> tuple[Tensor, int]:
    """A caption -> video index: 1-D int64, entries in [0, n_videos).

    ``n_videos=None`` means ``max + 1``. Returns the index and the number of videos.
    """
    t = _tensor("caption_to_video", caption_to_video)
    if t.dtype != torch.int64:
        raise TypeError(f"caption_to_video must be an int64 tensor; got {t.dtype}")
    if t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(f"caption_to_video must be a non-empty 1-D tensor; got shape "
                         f"{tuple(t.shape)}")
    if bool((t < 0).any()):
        raise ValueError(f"caption_to_video entries must be video indices >= 0; got "
                         f"{int(t[t < 0][0])} at position {int((t < 0).nonzero()[0, 0])}")
    if n_videos is None:
        n_videos = int(t.max()) + 1
    n_videos = positive_int("n_videos", n_videos)
    bad = t >= n_videos
    if bool(bad.any()):
        raise ValueError(f"caption_to_video entries must be video indices in [0, {n_videos}); "
                         f"got {int(t[bad][0])}")
    return t, n_videos
