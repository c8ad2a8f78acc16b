"""Which precision the Triton streaming gradient's G products need (issue 19, part 1).

An emulation on the CPU, no GPU and no timing: the gradient ``dX = s * G @ Y`` (and
``dY = s * G.T @ X``) with the float32 gradient tile ``G`` rounded as the kernels round it
before the tensor-core product, against the float64 oracle, next to the bound of
docs/math.md section 5 (``2 * err(float32 reference) + 1e-6`` for 16-bit storage,
``1e-5`` for float32 storage).

* 16-bit embeddings: ``G`` scaled by a power of two (so that float16's range holds it)
  and rounded once to the storage dtype ("single"), or split into a high and a low part,
  two products ("split"); float32 accumulation as on the tensor cores.
* float32 embeddings: every product (scores and ``G @ Y``) in tf32x3, as Triton's
  ``input_precision="tf32x3"`` forms it (operands rounded to tf32, the residuals
  truncated to tf32 by the tensor cores, three products).

    python bench/triton_grad_precision.py   # error, x the float32 reference's, of the bound
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python_ref

import python_ref as ref  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> tf32 (10 mantissa bits), nearest with ties away (``cvt.rna.tf32.f32``)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_trunc(x: torch.Tensor) -> torch.Tensor:
    """What an MMA reads of a float32 operand in tf32 mode: the low 13 bits dropped."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def mm_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_big, b_big = tf32_round(a), tf32_round(b)
    a_small, b_small = tf32_trunc(a - a_big), tf32_trunc(b - b_big)
    return a_small @ b_big + a_big @ b_small + a_big @ b_big


def g_scale(G: torch.Tensor) -> float:
    """The kernels' power of two: ``|G| <= max|coef_row| + max|coef_col|`` lands near 2^12."""
    return 2.0 ** (12 - math.floor(math.log2(float(G.abs().max()))))


def case(n, m, d, dtype, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    # correlated pairs, as after some training: the softmax is peaked, not uniform
    y = torch.nn.functional.normalize(x[:m] + 0.7 * torch.randn(m, d, generator=gen), dim=1)
    x, y = x.to(dtype), y.to(dtype)
    grads = {}
    for ref_dtype in (torch.float64, torch.float32):
        leaf = torch.float64 if ref_dtype == torch.float64 else dtype
        xr, yr = (t.to(leaf).requires_grad_() for t in (x, y))
        ref.ncl_loss_embeddings(xr, yr, scale, dtype=ref_dtype).backward()
        grads[ref_dtype] = (xr.grad, yr.grad)
    dx64, dy64 = grads[torch.float64]
    dx32, dy32 = grads[torch.float32]
    # the float32 G the kernels form (forward in float32, as theirs)
    xf, yf = x.float(), y.float()
    S = mm_tf32x3(xf, yf.T) if dtype == torch.float32 else xf @ yf.T
    sol = ref.sinkhorn(S, scale, n_iters=4, tol=None, dtype=torch.float32)
    G = ref.ncl_grad(S, scale, sol.f.float(), sol.g.float(), dtype=torch.float32).float()
    rows = {}
    if dtype == torch.float32:
        bound = 1e-5
        rows["tf32x3"] = (mm_tf32x3(G, yf) * scale, mm_tf32x3(G.T, xf) * scale)
        rows["fp32 (FMA)"] = ((G @ yf) * scale, (G.T @ xf) * scale)
    else:
        bound_x = 2 * rel(dx32, dx64) + 1e-6
        bound_y = 2 * rel(dy32, dy64) + 1e-6
        bound = min(bound_x, bound_y)
        k = g_scale(G)
        hi = (G * k).to(dtype)
        lo = (G * k - hi.float()).to(dtype)
        rows["single"] = ((hi.float() @ yf) * (scale / k), (hi.float().T @ xf) * (scale / k))
        rows["split"] = (((hi.float() @ yf) + (lo.float() @ yf)) * (scale / k),
                         ((hi.float().T @ xf) + (lo.float().T @ xf)) * (scale / k))
        rows["fp32 G"] = ((G @ yf) * scale, (G.T @ xf) * scale)
    out = []
    e32 = (rel(dx32, dx64), rel(dy32, dy64))
    for name, (dx, dy) in rows.items():
        ex, ey = rel(dx.to(dtype), dx64), rel(dy.to(dtype), dy64)
        if dtype == torch.float32:
            bx = by = bound
        else:
            bx, by = bound_x, bound_y
        out.append((name, ex, ey, max(ex / e32[0], ey / e32[1]), max(ex / bx, ey / by)))
    return out


def main():
    print("| N x M x D | dtype | scale | G products | err dX | err dY | x float32 ref | "
          "of bound |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    shapes = [(1024, 1024, 128), (1024, 1024, 512), (2048, 1536, 256)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, m, d in shapes:
            for scale in (10.0, 30.0, 100.0):
                for name, ex, ey, vs32, of_bound in case(n, m, d, dtype, scale, seed=n + d):
                    print(f"| {n} x {m} x {d} | {str(dtype)[6:]} | {scale:g} | {name} | "
                          f"{ex:.3g} | {ey:.3g} | {vs32:.2f} | {of_bound:.2f} |", flush=True)


if __name__ == "__main__":
    main()
