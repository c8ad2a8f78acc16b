"""The seam primitives as ``torch.library`` ops: ``torch.ops.ncl_kernels.<primitive>``.

Every primitive that a backend implements (docs/extending.md) is an op with a fake
implementation, one overload per backend (``.torch``, ``.cpu``, ``.cuda``, ``.triton``)
registered for the devices that backend takes, and ``.default`` for ``backend="auto"``
(``_library.py``). Like the backends' kernels, these ops do not validate their arguments
(the public functions of the package do); they are the composable, compile-friendly face of
the kernels:

    row_lse(S, scale, g)        -> (N,)   log sum_j exp(scale * S_ij + g_j)
    col_lse(S, scale, f)        -> (M,)   log sum_i exp(scale * S_ij + f_i)
    ncl_grad(S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, row_offset,
             need_grad)         -> (scale * G or an empty tensor, sum_ij G_ij S_ij)
    ncl_grad_(S, ...same..., row_offset) -> sum_ij G_ij S_ij; S <- scale * G (in place)
    apply_biases_(S, scale, f, g)          S <- scale * S + f_i + g_j (in place)
    row_lse_xy(X, Y, scale, g), col_lse_xy(X, Y, scale, f): as above on S = X @ Y.T
    ncl_grad_xy(X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, need_dx,
                need_dy)        -> (dX or empty, dY or empty, sum_ij G_ij S_ij)
    sinkhorn_step(S, scale, g, log_r)    -> (f, LSE_row(g), LSE_col(f)), f = log_r - LSE_row(g)
    sinkhorn_step_xy(X, Y, scale, g, log_r): the same on S = X @ Y.T
    target_logits_xy(X, Y, scale, y, z) -> (scale <x_i, y_{y_i}>, scale <x_{z_j}, y_j>),
                                rounded as the backend's streaming LSE passes round them

``G`` is the gradient of docs/math.md section 3 with the loss weights folded into
``coef_row``/``coef_col``; LSE and potential vectors are in the accumulation dtype
(float64 for float64 storage, else float32). ``ncl_grad`` and ``ncl_grad_`` are the two
forms of the backends' ``ncl_grad_`` primitive (a new buffer, or over ``S``).
"""

from __future__ import annotations

import torch

from . import _library
from ._dtypes import acc_dtype
from .backends import registry

Tensor = torch.Tensor

_GRAD_ARGS = ("float scale, Tensor f, Tensor g, Tensor lse_row, Tensor lse_col, "
              "Tensor coef_row, Tensor coef_col, Tensor y, Tensor z")


def _kernel(primitive: str):
    """The kernel factory of a primitive op whose arguments are the backend method's."""
    def for_backend(backend: str):
        def kernel(first, *args):
            return registry.resolve(backend, primitive, first.device.type, first.dtype)(
                first, *args)
        return kernel
    return for_backend


def _vector(first: Tensor, n: int) -> Tensor:
    return first.new_empty(n, dtype=acc_dtype(first.dtype))


_library.define("row_lse", "(Tensor S, float scale, Tensor? g) -> Tensor", _kernel("row_lse"),
                lambda S, scale, g: _vector(S, S.shape[0]))
_library.define("col_lse", "(Tensor S, float scale, Tensor? f) -> Tensor", _kernel("col_lse"),
                lambda S, scale, f: _vector(S, S.shape[1]))
_library.define("row_lse_xy", "(Tensor X, Tensor Y, float scale, Tensor? g) -> Tensor",
                _kernel("row_lse_xy"), lambda X, Y, scale, g: _vector(X, X.shape[0]))
_library.define("col_lse_xy", "(Tensor X, Tensor Y, float scale, Tensor? f) -> Tensor",
                _kernel("col_lse_xy"), lambda X, Y, scale, f: _vector(X, Y.shape[0]))


def _apply_biases_kernel(backend: str):
    def kernel(S, scale, f, g):
        registry.resolve(backend, "apply_biases_", S.device.type, S.dtype)(S, scale, f, g)
    return kernel


_library.define("apply_biases_", "(Tensor(a!) S, float scale, Tensor? f, Tensor? g) -> ()",
                _apply_biases_kernel, lambda S, scale, f, g: None)


def _grad_kernel(backend: str):
    def kernel(S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, row_offset,
               need_grad):
        out = torch.empty(S.shape, dtype=S.dtype, device=S.device) if need_grad else None
        ds = registry.resolve(backend, "ncl_grad_", S.device.type, S.dtype)(
            S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, out=out,
            row_offset=row_offset)
        return (S.new_empty(0) if out is None else out), ds
    return kernel


def _grad_fake(S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, row_offset,
               need_grad):
    out = torch.empty_like(S, memory_format=torch.contiguous_format) if need_grad \
        else S.new_empty(0)
    return out, S.new_empty((), dtype=acc_dtype(S.dtype))


_library.define("ncl_grad", f"(Tensor S, {_GRAD_ARGS}, int row_offset, bool need_grad) -> "
                "(Tensor, Tensor)", _grad_kernel, _grad_fake)


def _grad_inplace_kernel(backend: str):
    def kernel(S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, row_offset):
        return registry.resolve(backend, "ncl_grad_", S.device.type, S.dtype)(
            S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, out=S,
            row_offset=row_offset)
    return kernel


_library.define("ncl_grad_", f"(Tensor(a!) S, {_GRAD_ARGS}, int row_offset) -> Tensor",
                _grad_inplace_kernel,
                lambda S, *rest: S.new_empty((), dtype=acc_dtype(S.dtype)))


def _grad_xy_kernel(backend: str):
    def kernel(X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, need_dx,
               need_dy):
        dX, dY, ds = registry.resolve(backend, "ncl_grad_xy", X.device.type, X.dtype)(
            X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, need_dx=need_dx,
            need_dy=need_dy)
        return (X.new_empty(0) if dX is None else dX), (Y.new_empty(0) if dY is None else dY), ds
    return kernel


def _grad_xy_fake(X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z, need_dx,
                  need_dy):
    dX = torch.empty_like(X, memory_format=torch.contiguous_format) if need_dx \
        else X.new_empty(0)
    dY = torch.empty_like(Y, memory_format=torch.contiguous_format) if need_dy \
        else Y.new_empty(0)
    return dX, dY, X.new_empty((), dtype=acc_dtype(X.dtype))


_library.define("ncl_grad_xy", f"(Tensor X, Tensor Y, {_GRAD_ARGS}, bool need_dx, "
                "bool need_dy) -> (Tensor, Tensor, Tensor)", _grad_xy_kernel, _grad_xy_fake)

_library.define("sinkhorn_step", "(Tensor S, float scale, Tensor g, Tensor log_r) -> "
                "(Tensor f, Tensor lse_row, Tensor lse_col)", _kernel("sinkhorn_step"),
                lambda S, scale, g, log_r: (_vector(S, S.shape[0]), _vector(S, S.shape[0]),
                                            _vector(S, S.shape[1])))
_library.define("sinkhorn_step_xy", "(Tensor X, Tensor Y, float scale, Tensor g, Tensor log_r) "
                "-> (Tensor f, Tensor lse_row, Tensor lse_col)", _kernel("sinkhorn_step_xy"),
                lambda X, Y, scale, g, log_r: (_vector(X, X.shape[0]), _vector(X, X.shape[0]),
                                               _vector(X, Y.shape[0])))

_library.define("target_logits_xy", "(Tensor X, Tensor Y, float scale, Tensor y, Tensor z) "
                "-> (Tensor, Tensor)", _kernel("target_logits_xy"),
                lambda X, Y, scale, y, z: (_vector(X, X.shape[0]), _vector(X, Y.shape[0])))

#: the op names of the seam primitives (``ncl_grad`` and ``ncl_grad_`` are the two forms
#: of the backends' ``ncl_grad_``)
PRIMITIVE_OPS = ("row_lse", "col_lse", "ncl_grad", "ncl_grad_", "apply_biases_",
                 "sinkhorn_step", "row_lse_xy", "col_lse_xy", "ncl_grad_xy", "sinkhorn_step_xy",
                 "target_logits_xy")
