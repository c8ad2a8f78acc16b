"""The one backend registry: declarations, ``auto``'s routes, and resolution by delegation.

Each backend declares itself once, with a :class:`BackendSpec` in its own module (name,
devices, status, how it is built, and a ``kernels`` table with one entry per seam
primitive); :data:`SPECS` lists them. Everything else is derived here:

* which backend runs a primitive for tensors of a device type and dtype
  (:func:`resolve`), by one rule: walk a list of candidate backends and take the first
  that is usable, runs on that device and has a kernel for (primitive, dtype). For a
  named backend the list is the backend followed by its ``fallback`` chain (a Triton
  backend hands float64 to ``torch``); for ``"auto"`` it is :data:`ROUTES` (the
  measured preference per device type and primitive);
* streaming primitives a backend marks :data:`DERIVED`: its own dense kernel on chunks of
  rows of ``X @ Y.T`` (:mod:`.derived`);
* the report of :func:`ncl_kernels.backends` and the checks that name a backend which is
  not usable (:func:`check`).

The op library (``ncl_kernels/_library.py``) defines one ``torch.library`` overload per
declared backend for every op, so adding a backend is one declaration here plus its
kernels (docs/extending.md).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import derived
from .spec import DERIVED, DERIVED_FROM, PRIMITIVES, BackendSpec

# ``auto``: per device type and primitive, the backends fastest first (bench/RESULTS.md,
# GPU run G1 on an H200 for CUDA tensors; the CPU runs for CPU tensors); the first usable
# one with a kernel for the dtype wins, so every list ends in "torch". float64 has a list
# of its own per device type. Device types without an entry use ("torch",).
#
# CUDA, float32/bfloat16/float16: Triton for the dense row pass and the streaming LSE
# passes, the CUDA module for the column pass, the gradient and bias passes and for the
# streaming gradient (its chunked cuBLAS path measured faster than Triton's fused kernel).
# float16 was not measured and takes the bfloat16 order (same kernels, same bytes).
ROUTES: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "cpu": {p: ("cpu", "torch") for p in PRIMITIVES},
    "cuda": {
        # the steps: derived from the row and column routes below (the CUDA module has no
        # fused step; Triton's fused streaming step is not measured yet, so auto keeps the
        # two passes G1 measured: "cuda" first, whose step is derived)
        "sinkhorn_step": ("cuda", "triton", "torch"),
        "sinkhorn_step_xy": ("cuda", "triton", "torch"),
        # the targets' logits follow the streaming LSE passes they must agree with bitwise
        "target_logits_xy": ("triton", "cuda", "torch"),
        "row_lse": ("triton", "cuda", "torch"),
        "col_lse": ("cuda", "triton", "torch"),
        "ncl_grad_": ("cuda", "triton", "torch"),
        "apply_biases_": ("cuda", "triton", "torch"),
        "row_lse_xy": ("triton", "cuda", "torch"),
        "col_lse_xy": ("triton", "cuda", "torch"),
        "ncl_grad_xy": ("cuda", "torch"),
    },
}
# float64: the CUDA module has native float64 kernels; Triton delegates float64 to torch.
ROUTES_FLOAT64: Dict[str, Tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")}


def _declared() -> Dict[str, BackendSpec]:
    """The built-in backends, in the order the report lists them."""
    from .cpu import SPEC as CPU
    from .cuda import SPEC as CUDA
    from .torch import SPEC as TORCH
    from .triton import SPEC as TRITON
    return {s.name: s for s in (TORCH, CPU, CUDA, TRITON)}


class _Instances(dict):
    """The kernel objects by backend name. Resolved kernels are cached, so replacing an
    object (``replaced``, or a test's ``monkeypatch.setitem``) drops the cache."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        clear_caches()

    def __delitem__(self, key):
        super().__delitem__(key)
        clear_caches()

    def pop(self, key, *default):
        out = super().pop(key, *default)
        clear_caches()
        return out


SPECS: Dict[str, BackendSpec] = _declared()
_instances: Dict[str, object] = _Instances()
_listeners: List[Callable[[BackendSpec], None]] = []


# -- declarations -------------------------------------------------------------------------

def names() -> Tuple[str, ...]:
    return tuple(SPECS)


def spec(name: str) -> BackendSpec:
    return SPECS[name]


def subscribe(listener: Callable[[BackendSpec], None]) -> None:
    """Call ``listener(spec)`` for every declared backend now and for each one registered
    later (the op library defines its overloads this way)."""
    _listeners.append(listener)
    for s in list(SPECS.values()):
        listener(s)


def register(new: BackendSpec) -> None:
    """Declare a backend at run time (a plug-in, or a test's emulated device)."""
    if new.name in SPECS or new.name in ("auto", "default"):
        raise ValueError(f"backend {new.name!r} is already declared")
    missing = set(PRIMITIVES) - set(new.kernels)
    if missing:
        raise ValueError(f"backend {new.name!r} declares no entry for {sorted(missing)}")
    SPECS[new.name] = new
    clear_caches()
    for listener in _listeners:
        listener(new)


def unregister(name: str) -> None:
    """Forget a backend declared with :func:`register` (its op overloads stay defined)."""
    if name in _declared():
        raise ValueError(f"backend {name!r} is built in and cannot be unregistered")
    SPECS.pop(name, None)
    _instances.pop(name, None)
    clear_caches()


def instance(name: str):
    """The kernel object of backend ``name`` (built on first use)."""
    if name not in _instances:
        _instances[name] = SPECS[name].factory()
    return _instances[name]


@contextlib.contextmanager
def replaced(name: str, obj):
    """Run with ``obj`` as backend ``name``'s kernel object (tests, benchmarks: e.g. a
    ``TritonBackend(block_cap=16)``); the previous object comes back afterwards."""
    had = name in _instances
    old = _instances.get(name)
    _instances[name] = obj
    try:
        yield obj
    finally:
        if had:
            _instances[name] = old
        else:
            _instances.pop(name, None)


# -- status -------------------------------------------------------------------------------

def status(name: str) -> Tuple[bool, bool, str]:
    return SPECS[name].status()


def devices(name: str) -> Optional[Tuple[str, ...]]:
    return SPECS[name].devices()


def runs_on(name: str, device_type: str) -> bool:
    """Whether ``name`` is usable here and takes tensors of ``device_type``."""
    wanted = devices(name)
    return status(name)[1] and (wanted is None or device_type in wanted)


def report() -> Dict[str, dict]:
    """``{name: {"built", "usable", "devices", "why", "build"}}`` for every backend."""
    out = {}
    for name, s in SPECS.items():
        built, usable, why = s.status()
        where = s.devices()
        out[name] = {"built": built, "usable": usable,
                     "devices": "any" if where is None else ",".join(where), "why": why,
                     "build": s.build}
    return out


def check(name, device: torch.device) -> str:
    """Refuse a backend name that is unknown, not usable here, or not for ``device``
    (``ValueError`` saying why); returns the name."""
    if name == "auto":
        return name
    if not isinstance(name, str) or name not in SPECS:
        options = ", ".join(map(repr, ("auto",) + names()))
        raise ValueError(f"backend must be one of {options}; got {name!r}")
    built, usable, why = status(name)
    if not usable:
        raise ValueError(f"backend {name!r} is not usable here: {why}")
    wanted = devices(name)
    if wanted is not None and device.type not in wanted:
        raise ValueError(f"backend {name!r} runs on {' or '.join(wanted)} tensors; got "
                         f"tensors on {device}")
    return name


# -- resolution ---------------------------------------------------------------------------

def candidates(name: str, device_type: str, primitive: str, dtype: torch.dtype
               ) -> Tuple[str, ...]:
    """The backends tried, in order, for ``name`` (or ``"auto"``)."""
    if name == "auto":
        if dtype == torch.float64:
            return ROUTES_FLOAT64.get(device_type, ("torch",))
        return ROUTES.get(device_type, {}).get(primitive, ("torch",))
    chain, seen = [], set()
    while name is not None and name not in seen:
        chain.append(name)
        seen.add(name)
        name = SPECS[name].fallback
    return tuple(chain)


def _kernel_in(name: str, backend: str, primitive: str, dtype: torch.dtype,
               device_type: str) -> Optional[Callable]:
    """``backend``'s own kernel for (primitive, dtype), or for a primitive it derives, the
    derivation over what ``name`` resolves for its parts (``auto``'s derived step runs
    ``auto``'s row and column routes); None when it has neither."""
    entry = SPECS[backend].kernels[primitive]
    if entry == DERIVED:
        parts = [_resolve(name, part, device_type, dtype)[1]
                 for part in DERIVED_FROM[primitive]]
        return functools.partial(getattr(derived, primitive), *parts)
    if dtype not in entry:
        return None
    return getattr(instance(backend), primitive)


@functools.lru_cache(maxsize=None)
def _resolve(name: str, primitive: str, device_type: str, dtype: torch.dtype):
    if name != "auto" and name not in SPECS:
        raise ValueError(f"backend {name!r} is not declared (any more)")
    for backend in candidates(name, device_type, primitive, dtype):
        if backend in SPECS and runs_on(backend, device_type):
            kernel = _kernel_in(name, backend, primitive, dtype, device_type)
            if kernel is not None:
                return backend, kernel
    raise ValueError(f"no backend runs {primitive} on {device_type} tensors of {dtype} for "
                     f"backend={name!r}")


def resolve(name: str, primitive: str, device_type: str, dtype: torch.dtype) -> Callable:
    """The kernel that runs ``primitive`` for backend ``name`` on (device type, dtype)."""
    return _resolve(name, primitive, device_type, dtype)[1]


def chosen(name: str, primitive: str, device_type: str, dtype: torch.dtype) -> str:
    """Which backend :func:`resolve` picks (its name)."""
    return _resolve(name, primitive, device_type, dtype)[0]


def clear_caches() -> None:
    _resolve.cache_clear()


class KernelSet:
    """The seam primitives of backend ``name`` for tensors of one device type, each
    resolved per call by the storage dtype of its first argument (what
    ``ncl_kernels.backends.get`` returns)."""

    def __init__(self, name: str, device_type: str):
        self.name, self.device_type = name, device_type

    def __getattr__(self, primitive: str):
        if primitive not in PRIMITIVES:
            raise AttributeError(primitive)

        def call(first, *args, **kwargs):
            return resolve(self.name, primitive, self.device_type, first.dtype)(
                first, *args, **kwargs)

        call.__name__ = primitive
        self.__dict__[primitive] = call
        return call

    @property
    def routes(self) -> Dict[str, Dict[str, str]]:
        """``{primitive: {"float": backend, "float64": backend}}``: what runs each one."""
        return {p: {"float": chosen(self.name, p, self.device_type, torch.float32),
                    "float64": chosen(self.name, p, self.device_type, torch.float64)}
                for p in PRIMITIVES}

    def __repr__(self) -> str:
        return f"KernelSet({self.name!r}, {self.device_type!r})"
