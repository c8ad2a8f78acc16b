"""Triton backend: fused dense passes and flash-style streaming kernels.

Importing this package does not import Triton (the registry imports it on every
``import ncl_kernels``); the kernels are compiled on first use.

Where it runs:

* CUDA tensors, when Triton is installed and PyTorch sees a GPU;
* CPU tensors, when ``TRITON_INTERPRET=1`` was set before Triton was first imported: the
  same kernels then run in Triton's (slow, numpy-based) interpreter. That is the CI lane
  that checks the kernels on a machine without a GPU. ``backends()["triton"]["devices"]``
  says which of the two applies.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional, Tuple

from ..spec import DERIVED, FLOAT, BackendSpec

_import_error: Optional[str] = None


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (then they take CPU tensors).

    ``triton.jit`` reads ``TRITON_INTERPRET`` when the kernels are defined, so once the
    kernel module is imported its kernels decide; before that, the environment does.
    """
    dense = sys.modules.get(__name__ + ".dense")
    if dense is not None:
        return type(dense.row_lse_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def devices() -> Tuple[str, ...]:
    return ("cpu",) if interpreting() else ("cuda",)


def _importable() -> Tuple[bool, str]:
    global _import_error
    if _import_error is None:
        try:
            import triton  # noqa: F401
            _import_error = ""
        except (ImportError, RuntimeError, OSError) as exc:  # a broken install: report it
            _import_error = f"triton is installed but does not import ({exc})"
    return not _import_error, _import_error


def status() -> Tuple[bool, bool, str]:
    """``(built, usable, why)`` for the registry; "built" means Triton is installed."""
    if importlib.util.find_spec("triton") is None:
        return False, False, "triton is not installed (pip install 'ncl_kernels[triton]')"
    if not interpreting():
        import torch
        if not torch.cuda.is_available():
            return True, False, ("no CUDA device is visible to PyTorch (set TRITON_INTERPRET=1 "
                                 "before importing triton to run the kernels on CPU tensors "
                                 "in Triton's interpreter, slowly)")
    ok, why = _importable()
    return True, ok, why


def make_backend():
    from .backend import TritonBackend
    return TritonBackend()


SPEC = BackendSpec(
    name="triton",
    devices=devices,
    status=status,
    factory=make_backend,
    kernels={**{p: FLOAT for p in ("row_lse", "col_lse", "ncl_grad_", "apply_biases_",
                                   "row_lse_xy", "col_lse_xy", "ncl_grad_xy",
                                   "sinkhorn_step_xy", "target_logits_xy")},
             "sinkhorn_step": DERIVED},
    build="Triton kernels (ncl_kernels/backends/triton), compiled on first use; needs "
          "pip install 'ncl_kernels[triton]' and a CUDA GPU, or TRITON_INTERPRET=1",
)
