"""What a backend declares: :class:`BackendSpec`, and the seam's primitive names.

A leaf module (it imports no backend), so that each backend module can declare itself and
the registry can list the declarations without circular imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, FrozenSet, Mapping, Optional, Tuple, Union

import torch

from .._dtypes import FLOAT_DTYPES, STORAGE_DTYPES

#: the seam: every backend has an entry for each of these (docs/extending.md)
PRIMITIVES = ("row_lse", "col_lse", "ncl_grad_", "apply_biases_", "sinkhorn_step",
              "row_lse_xy", "col_lse_xy", "ncl_grad_xy", "sinkhorn_step_xy",
              "target_logits_xy")
#: a primitive built from others (see :mod:`.derived`)
DERIVED = "derived"
#: what each primitive that may be derived is built from
DERIVED_FROM = {"row_lse_xy": ("row_lse",), "col_lse_xy": ("row_lse",),
                "ncl_grad_xy": ("ncl_grad_",), "sinkhorn_step": ("row_lse", "col_lse"),
                "sinkhorn_step_xy": ("row_lse_xy", "col_lse_xy"), "target_logits_xy": ()}

ALL = frozenset(STORAGE_DTYPES)
FLOAT = frozenset(FLOAT_DTYPES)

Kernels = Mapping[str, Union[FrozenSet[torch.dtype], str]]


@dataclass(frozen=True)
class BackendSpec:
    """A backend's declaration.

    ``devices()``: the device types its kernels take (``None``: any device).
    ``status()``: ``(built, usable, why)``; ``why`` says what is missing when not usable.
    ``factory()``: the object whose methods are its kernels (built once, on first use).
    ``kernels``: for every primitive of :data:`PRIMITIVES`, the storage dtypes it runs
    itself, or :data:`DERIVED`; anything else is delegated to ``fallback``.
    ``build``: one line saying how it is built (shown by :func:`report`).
    """

    name: str
    devices: Callable[[], Optional[Tuple[str, ...]]]
    status: Callable[[], Tuple[bool, bool, str]]
    factory: Callable[[], object]
    kernels: Kernels
    build: str
    fallback: Optional[str] = "torch"


