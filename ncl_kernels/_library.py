"""How every op of ``torch.ops.ncl_kernels`` is defined: one overload per backend.

:func:`define` takes an op's schema, a fake (meta) implementation, and a factory that
gives the kernel for a backend name; it defines

* ``torch.ops.ncl_kernels.<op>.default``: ``backend="auto"``, registered for CPU and CUDA
  tensors and, for any other device, as the composite (``torch``) implementation;
* ``torch.ops.ncl_kernels.<op>.<backend>`` for every backend the registry declares
  (``torch``, ``cpu``, ``cuda``, ``triton``, and any registered later), registered for
  the device types that backend takes (``torch``: every device).

So the backend is chosen by which overload is called, never by an argument of the op:
``torch.compile`` sees a plain op, ``torch.library.opcheck`` checks each backend's
overload, and the autograd formula of an op's overload calls the backward op of the same
backend. The eager entry points call an overload once per public call; inside an op the
kernels are called directly (``registry.resolve``), without a dispatch per pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .backends import registry
from .backends.spec import BackendSpec

NAMESPACE = "ncl_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")
#: (op, backend) pairs whose overload is defined. A backend registered at run time keeps
#: its overloads after it is unregistered (PyTorch cannot drop one overload of an op
#: cleanly); they resolve the backend by name when called, so registering the name again
#: reuses them, and calling them meanwhile raises the registry's "not declared" error.
_overloads: set = set()

_AUTO_KEYS = ("CPU", "CUDA", "CompositeExplicitAutograd")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class OpDef:
    name: str
    schema: str
    kernel: Callable[[str], Callable]          # backend name -> implementation
    fake: Callable
    #: (backend name -> backward, setup_context), or None when not differentiable
    autograd: Optional[Tuple[Callable[[str], Callable], Callable]] = None


_defs: Dict[str, OpDef] = {}


def overload_name(backend: str) -> str:
    return "default" if backend == "auto" else backend


def op(name: str, backend: str = "auto") -> torch._ops.OpOverload:
    """The overload of ``ncl_kernels::<name>`` that runs ``backend`` (or ``"auto"``)."""
    return getattr(getattr(torch.ops.ncl_kernels, name), overload_name(backend))


def _dispatch_keys(backend: str) -> Tuple[str, ...]:
    if backend == "auto":
        return _AUTO_KEYS
    devices = registry.devices(backend)
    if devices is None:
        return ("CompositeExplicitAutograd",)
    return tuple(_DEVICE_KEYS.get(d, d.upper()) for d in devices)


def _register(d: OpDef, backend: str, lib: torch.library.Library = LIB) -> None:
    if (d.name, backend) in _overloads:
        return
    _overloads.add((d.name, backend))
    qualified = d.name if backend == "auto" else f"{d.name}.{backend}"
    lib.define(qualified + d.schema)
    kernel = d.kernel(backend)
    for key in _dispatch_keys(backend):
        lib.impl(qualified, kernel, key)
    full = f"{NAMESPACE}::{qualified}"
    _bump_versions_of_mutated(lib, qualified, full)
    torch.library.register_fake(full, d.fake, lib=lib)
    if d.autograd is not None:
        backward, setup_context = d.autograd
        torch.library.register_autograd(full, backward(backend), setup_context=setup_context,
                                        lib=lib)


def _bump_versions_of_mutated(lib: torch.library.Library, qualified: str, full: str) -> None:
    """An op that writes an argument (``Tensor(a!)``) bumps that tensor's version counter,
    as PyTorch's own in-place ops do, so that autograd refuses to use a saved tensor that
    the op has overwritten (``torch.library.custom_op`` does the same)."""
    name, _, overload = full.partition("::")[2].partition(".")
    packet = getattr(torch.ops.ncl_kernels, name)
    handle = getattr(packet, overload or "default")
    written = [i for i, a in enumerate(handle._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    if not written:
        return
    below = torch._C._after_ADInplaceOrView_keyset

    def bump_then_run(keyset, *args):
        for i in written:
            if i < len(args) and isinstance(args[i], torch.Tensor):
                torch.autograd.graph.increment_version(args[i])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return handle.redispatch(keyset & below, *args)

    lib.impl(qualified, bump_then_run, "ADInplaceOrView", with_keyset=True)


def define(name: str, schema: str, kernel: Callable[[str], Callable], fake: Callable,
           autograd=None) -> None:
    """Define ``ncl_kernels::<name>`` with ``schema`` (``"(Tensor S, ...) -> Tensor"``) and
    an overload for ``"auto"`` and for every declared backend (see the module docstring)."""
    if name in _defs:
        raise ValueError(f"op {name!r} is already defined")
    d = _defs[name] = OpDef(name, schema, kernel, fake, autograd)
    for backend in ("auto",) + registry.names():
        _register(d, backend)


def defined() -> Tuple[str, ...]:
    return tuple(_defs)


def _on_new_backend(spec: BackendSpec) -> None:
    for d in _defs.values():  # none yet for the built-in backends, seen at import
        _register(d, spec.name)


def remove_backend(name: str) -> None:
    """Undo a run-time :func:`registry.register` (see ``_overloads``)."""
    registry.unregister(name)


registry.subscribe(_on_new_backend)


#: ``registry.check`` under ``torch.compile`` runs once at trace time (its answer is a
#: constant of the graph): it reads module state dynamo cannot trace (lazy imports)
check_backend = torch.compiler.assume_constant_result(registry.check)
