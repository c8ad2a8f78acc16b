"""The primitive seam every backend implements, and the generic streaming built on it.

A backend is an object with the dense primitives of ARCHITECTURE.md (``row_lse``,
``col_lse``, ``ncl_grad_``, ``apply_biases_``) and the streaming ones (``row_lse_xy``,
``col_lse_xy``, ``ncl_grad_xy``). Everything above the seam (the Sinkhorn driver, the loss,
autograd, retrieval) is written once and calls these.

Conventions shared by every primitive:

* ``scale`` is a Python float (the caller has validated it).
* The accumulation dtype is float64 for float64 storage and float32 otherwise; potentials,
  LSE vectors and coefficient vectors are given and returned in that dtype.
* ``-inf`` scores are masks; an LSE over an all-masked row or column is ``-inf``.
* No primitive validates its arguments: ``ncl_kernels._validate`` did that before.

This base class provides the streaming primitives from the dense ones: a chunk of rows of
``S = X @ Y.T`` is multiplied with ``torch.matmul`` into a buffer of ``rows x M`` elements,
reduced by the backend's own dense primitive, and merged. A backend with real streaming
kernels overrides them.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a storage dtype (SPEC.md section 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(n_rows: int, n_cols: int, budget: int) -> Iterator[Tuple[int, int]]:
    """Split ``n_rows`` into ranges whose ``rows * n_cols`` stays within ``budget`` elements."""
    step = max(1, budget // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


class Backend:
    """Base of all backends: generic chunked streaming over the dense primitives."""

    name = "base"
    #: elements of the largest temporary a chunked primitive may allocate (rows x columns);
    #: tests lower it to force several chunks on small inputs.
    chunk_elems = 1 << 22

    # -- dense primitives (implemented by subclasses) ------------------------------------
    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def col_lse(self, S: Tensor, scale: float, f: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0) -> Tensor:
        """Gradient pass: returns ``sum_ij G_ij S_ij`` and writes ``scale * G`` into ``out``.

        ``G`` is SPEC.md section 3's gradient with respect to the logits, with the loss
        weights (and any upstream gradient) folded into ``coef_row`` (N,) and ``coef_col``
        (M,), which are zero for rows and columns without a target. ``out`` is ``None``
        (only the sum is wanted), ``S`` itself (in place: each element is read before it is
        written) or another tensor of S's shape. ``row_offset`` is the global index of S's
        first row, so that a chunk of rows can match the column targets ``z``.
        """
        raise NotImplementedError

    def apply_biases_(self, S: Tensor, scale: float, f: Optional[Tensor],
                      g: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    # -- streaming primitives (generic: matmul a chunk of rows, reduce it densely) -------
    def row_lse_xy(self, X: Tensor, Y: Tensor, scale: float,
                   g: Optional[Tensor] = None) -> Tensor:
        acc = acc_dtype(X.dtype)
        Ya = Y.to(acc)
        out = torch.empty(X.shape[0], dtype=acc, device=X.device)
        for start, stop in row_chunks(X.shape[0], Y.shape[0], self.chunk_elems):
            # the chunk of S is a temporary of this statement: one chunk alive at a time
            out[start:stop] = self.row_lse(X[start:stop].to(acc) @ Ya.T, scale, g)
        return out

    def col_lse_xy(self, X: Tensor, Y: Tensor, scale: float,
                   f: Optional[Tensor] = None) -> Tensor:
        # LSE over the rows of X @ Y.T is LSE over the columns of Y @ X.T.
        return self.row_lse_xy(Y, X, scale, f)

    def target_logits_xy(self, X: Tensor, Y: Tensor, scale: float, y: Tensor,
                         z: Tensor) -> Tuple[Tensor, Tensor]:
        """The targets' logits: ``scale * <x_i, y_{y_i}>`` per row and ``scale * <x_{z_j},
        y_j>`` per column (any finite value where the target is -1).

        They are entries of the logits that ``row_lse_xy`` and ``col_lse_xy`` form, and a
        backend whose streaming kernels round their score tiles differently from this
        elementwise product overrides it to round them the same way: the loss then
        subtracts a target logit from the LSE that contains it without a stray ulp (with
        one pair the two cancel exactly).
        """
        acc = acc_dtype(X.dtype)
        Xa, Ya = X.to(acc), Y.to(acc)
        return ((Xa * Ya[y.clamp(min=0)]).sum(1) * scale,
                (Xa[z.clamp(min=0)] * Ya).sum(1) * scale)

    def ncl_grad_xy(self, X, Y, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                    need_dx=True, need_dy=True):
        """Streaming gradient: ``(dX, dY, dscale_sum)`` with ``dX = scale * G @ Y`` etc.

        ``dX``/``dY`` come back in X's/Y's dtype (``None`` when not needed); the third
        value is ``sum_ij G_ij S_ij`` in the accumulation dtype.
        """
        acc = acc_dtype(X.dtype)
        Xa, Ya = X.to(acc), Y.to(acc)
        dX = torch.empty_like(Xa) if need_dx else None
        dY = torch.zeros_like(Ya) if need_dy else None
        ds = torch.zeros((), dtype=acc, device=X.device)
        for start, stop in row_chunks(X.shape[0], Y.shape[0], self.chunk_elems):
            S = Xa[start:stop] @ Ya.T
            # In place: the chunk buffer becomes scale * G for the two products below.
            ds += self.ncl_grad_(S, scale, f[start:stop], g, lse_row[start:stop], lse_col,
                                 coef_row[start:stop], coef_col, y[start:stop], z,
                                 out=S, row_offset=start)
            if need_dx:
                torch.matmul(S, Ya, out=dX[start:stop])
            if need_dy:
                dY.addmm_(S.T, Xa[start:stop])
            del S  # free this chunk before the next one is multiplied
        return (None if dX is None else dX.to(X.dtype),
                None if dY is None else dY.to(Y.dtype), ds)
