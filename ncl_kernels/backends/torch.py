"""Pure-PyTorch backend: every primitive, on any device, in chunks of rows.

It is the fallback everywhere (every other backend delegates to it what it does not run
itself) and the template the compiled backends are measured against. Each dense primitive
walks S in chunks of ``derived.CHUNK_ELEMS`` elements, so its temporaries stay O(chunk)
rather than O(N x M); low-precision storage is upcast chunk by chunk and accumulated in
float32. Its streaming primitives are the chunked ones derived from these.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._dtypes import acc_dtype
from .derived import row_chunks
from .spec import ALL, DERIVED, BackendSpec

Tensor = torch.Tensor

NEG_INF = float("-inf")


def _lse_(L: Tensor, dim: int) -> Tensor:
    """``logsumexp(L, dim)`` that reuses ``L`` as its scratch buffer (L is destroyed).

    ``torch.logsumexp`` allocates temporaries the size of its input; here the only
    chunk-sized buffer is the caller's. An all -inf slice gives -inf (its max is taken as 0
    so that no (-inf) - (-inf) is formed).
    """
    top = L.amax(dim, keepdim=True)
    top.masked_fill_(top == NEG_INF, 0.0)
    L.sub_(top).exp_()
    return torch.log(L.sum(dim)) + top.squeeze(dim)


def _softmax_part_(x: Tensor, lse: Tensor) -> Tensor:
    """``x <- exp(x - lse)`` in place, with 0 where ``lse`` is -inf (then x is -inf too)."""
    x.sub_(lse).exp_()
    return x.masked_fill_(lse == NEG_INF, 0.0)


class TorchBackend:
    name = "torch"

    def _chunks(self, S: Tensor):
        return row_chunks(S.shape[0], S.shape[1])

    def row_lse(self, S: Tensor, scale: float, g: Optional[Tensor] = None) -> Tensor:
        acc = acc_dtype(S.dtype)
        out = torch.empty(S.shape[0], dtype=acc, device=S.device)
        for start, stop in self._chunks(S):
            L = S[start:stop].to(acc) * scale   # a new buffer, even when S is acc already
            if g is not None:
                L += g
            out[start:stop] = _lse_(L, 1)
        return out

    def col_lse(self, S: Tensor, scale: float, f: Optional[Tensor] = None) -> Tensor:
        acc = acc_dtype(S.dtype)
        out = torch.full((S.shape[1],), NEG_INF, dtype=acc, device=S.device)
        for start, stop in self._chunks(S):
            L = S[start:stop].to(acc) * scale
            if f is not None:
                L += f[start:stop, None]
            out = torch.logaddexp(out, _lse_(L, 0))
        return out

    def ncl_grad_(self, S, scale, f, g, lse_row, lse_col, coef_row, coef_col, y, z,
                  out=None, row_offset=0):
        acc = acc_dtype(S.dtype)
        M = S.shape[1]
        ds = torch.zeros((), dtype=acc, device=S.device)
        cols = torch.arange(M, device=S.device)
        for start, stop in self._chunks(S):
            Sa = S[start:stop].to(acc)          # may alias S when S is already acc
            rows = torch.arange(stop - start, device=S.device)
            cr = coef_row[start:stop]
            # two chunk buffers: G (the row term, then the sum) and T (the column term,
            # then G * S for dscale). The logits are rounded exactly as in row_lse and
            # col_lse, so a softmax that should be exactly 1 is.
            G = Sa * scale
            T = G + f[start:stop, None]
            _softmax_part_(G.add_(g), lse_row[start:stop, None]).mul_(cr[:, None])
            G.add_(_softmax_part_(T, lse_col[None, :]).mul_(coef_col))
            # the "- [j = y_i]" and "- [i = z_j]" terms, without host syncs: entries whose
            # target lies elsewhere subtract zero at a clamped (harmless) position.
            yc = y[start:stop]
            G.index_put_((rows, yc.clamp(min=0)), -cr * (yc >= 0), accumulate=True)
            zi = z - (row_offset + start)
            here = (zi >= 0) & (zi < stop - start)
            G.index_put_((zi.clamp(0, stop - start - 1), cols), -coef_col * here,
                         accumulate=True)
            # masked (-inf) scores do not depend on the scale: they add nothing to dscale
            ds += torch.mul(G, Sa, out=T).masked_fill_(Sa == NEG_INF, 0.0).sum()
            if out is not None:
                out[start:stop] = G.mul_(scale)
        return ds

    def apply_biases_(self, S, scale, f=None, g=None):
        acc = acc_dtype(S.dtype)
        for start, stop in self._chunks(S):
            L = S[start:stop].to(acc) * scale
            if f is not None:
                L += f[start:stop, None]
            if g is not None:
                L += g
            S[start:stop] = L
        return S


SPEC = BackendSpec(
    name="torch",
    devices=lambda: None,
    status=lambda: (True, True, ""),
    factory=TorchBackend,
    kernels={"row_lse": ALL, "col_lse": ALL, "ncl_grad_": ALL, "apply_biases_": ALL,
             "sinkhorn_step": DERIVED, "row_lse_xy": DERIVED, "col_lse_xy": DERIVED,
             "ncl_grad_xy": DERIVED, "sinkhorn_step_xy": DERIVED,
             "target_logits_xy": DERIVED},
    build="pure PyTorch: always available, on every device",
    fallback=None,
)
