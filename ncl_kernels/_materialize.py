"""When the embedding forms should form ``S = X @ Y.T`` once instead of streaming it.

Streaming recomputes the product in every pass over the scores (2 N M D flops each); forming
S once costs one product and a write, after which every pass is a read of N M float32
values. So forming S wins when it fits in memory and D is large next to the read and exp
cost of a pass; streaming wins where memory is short. :func:`decide` applies a cost model
with the per-pass costs measured on each kind of device (``COSTS``; the figures and how they
were measured are in bench/RESULTS.md, and ``bench/profile_materialize.py`` measures them
for the CPU it runs on), under a memory budget the caller can set:

    passes      = 2 n_iters + 1 LSE passes (+ 1 for a backward: the streaming backward
                  recomputes S once; the dense one reads and writes it once)
    streaming   = passes * 2 D / stream_flops                     (per element of S)
    materialize = 2 D / product_flops + write + passes * dense_pass (+ write, backward)

and forms S when ``materialize < streaming`` and ``4 N M`` bytes (float32; 8 for float64)
fit ``budget``. The gradient products ``G @ Y`` and ``G.T @ X`` are the same in both forms
and left out. ``materialize=True`` / ``False`` override the model (True ignores the budget).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _library, _validate as V
from ._dtypes import acc_dtype

#: the default memory budget for a formed S: 256 MiB (2**26 float32 values)
DEFAULT_BUDGET = 1 << 28


class Costs(NamedTuple):
    """Per-element costs of one kind of device (seconds per element of S, flop/s)."""

    stream_flops: float   # effective flop/s of a streaming LSE pass, its exp work included
    product_flops: float  # flop/s of forming S once (a matmul into float32)
    dense_pass: float     # s per element of one LSE pass over float32 S in memory
    write: float          # s per element of writing float32 S


# Keyed by (device type, "low" for bfloat16/float16 or "wide" for float32/float64).
# CUDA: NVIDIA H200, GPU run G1 (bench/RESULTS.md): Triton's streaming row pass at
# 65536^2 x 512 bf16, torch.matmul at that shape, the dense fp32/bf16 row passes at
# 32768^2, the copy roof; float32 products on CUDA cores (no TF32). CPU: the 2-core
# development machine (AMD EPYC, AVX2), 2 threads, bf16 and f32 at n = 2048, d = 128
# (bench/profile_materialize.py; bench/RESULTS.md, CPU 2026-12-01).
COSTS = {
    ("cuda", "low"): Costs(stream_flops=3.07e14, product_flops=5.91e14, dense_pass=1.0e-12,
                           write=1.0e-12),
    ("cuda", "wide"): Costs(stream_flops=4.0e13, product_flops=5.09e13, dense_pass=1.0e-12,
                            write=1.0e-12),
    ("cpu", "low"): Costs(stream_flops=6.3e10, product_flops=8.2e10, dense_pass=6.4e-10,
                          write=2.5e-10),
    ("cpu", "wide"): Costs(stream_flops=7.0e10, product_flops=1.0e11, dense_pass=5.5e-10,
                           write=1.8e-10),
}


def _costs(device_type: str, dtype: torch.dtype) -> Optional[Costs]:
    kind = "low" if dtype in (torch.bfloat16, torch.float16) else "wide"
    return COSTS.get((device_type, kind))


def estimate(n: int, m: int, d: int, dtype: torch.dtype, device_type: str, passes: int,
             backward: bool):
    """``(streaming seconds, materializing seconds)`` by the model (None: no costs known
    for this device)."""
    c = _costs(device_type, dtype)
    if c is None:
        return None
    elems = float(n) * m
    stream = (passes + backward) * 2.0 * d / c.stream_flops
    formed = (2.0 * d / c.product_flops + c.write + passes * c.dense_pass
              + backward * (c.dense_pass + c.write))
    return stream * elems, formed * elems


def decide(materialize, n: int, m: int, d: int, dtype: torch.dtype, device_type: str, *,
           passes: int, backward: bool, budget: Optional[int] = None) -> bool:
    """Whether to form S (see the module docstring); ``materialize`` True/False decides."""
    if materialize is not None:
        return bool(materialize)
    budget = DEFAULT_BUDGET if budget is None else budget
    if n * m * acc_dtype(dtype).itemsize > budget:
        return False
    times = estimate(n, m, d, dtype, device_type, passes, backward)
    return times is not None and times[1] < times[0]


def choose(materialize, memory_budget, x: torch.Tensor, y: torch.Tensor, *, passes: int,
           backward: bool) -> bool:
    """:func:`decide` for embeddings ``x``, ``y``, with the public arguments checked."""
    if materialize is not None:
        V.flag("materialize", materialize)
    budget = None if memory_budget is None else V.count("memory_budget", memory_budget)
    return decide(materialize, x.shape[0], y.shape[0], x.shape[1], x.dtype, x.device.type,
                  passes=passes, backward=backward, budget=budget)


def product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y.T`` in the accumulation dtype (float32; float64 for float64), differentiable.

    On CUDA, bfloat16/float16 operands multiply on tensor cores straight into float32;
    elsewhere they are upcast first.
    """
    acc = acc_dtype(x.dtype)
    if x.dtype == acc:
        return x @ y.T
    if x.is_cuda:
        return torch.mm(x, y.T, out_dtype=acc)
    return x.to(acc) @ y.to(acc).T


# -- the checked product: an op, so that its data checks name the caller's embeddings ---------

def _product_kernel(backend: str):
    def kernel(x, y, x_name, y_name, widen):
        V.embeddings_values(x, y, (x_name, y_name))
        return product(x, y) if widen else x @ y.T
    return kernel


def _product_fake(x, y, x_name, y_name, widen):
    dtype = acc_dtype(x.dtype) if widen else x.dtype
    return x.new_empty((x.shape[0], y.shape[0]), dtype=dtype)


def _product_setup(ctx, inputs, output):
    x, y, x_name, y_name = inputs[:4]
    ctx.save_for_backward(x, y)
    ctx.names = (x_name, y_name)


def _product_backward_kernel(backend: str):
    def kernel(dS, x, y, x_name, y_name, need_x, need_y):
        out = []
        for need, a, b, name in ((need_x, dS, y, x_name), (need_y, dS.T, x, y_name)):
            grad = (a @ b.to(a.dtype)).to(b.dtype) if need else b.new_empty(0)
            if need and grad.dtype == torch.float16:
                # computed in float32: a float16 gradient may not hold it
                V.finite(f"the float16 gradient of {name}", grad)
            out.append(grad)
        return tuple(out)
    return kernel


def _product_backward_fake(dS, x, y, x_name, y_name, need_x, need_y):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(y) if need_y else y.new_empty(0))


def _product_backward(backend: str):
    backward_op = _library.op("checked_product_backward", backend)

    def backward(ctx, dS):
        x, y = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        dx, dy = backward_op(dS, x, y, *ctx.names, need_x, need_y)
        return (dx if need_x else None), (dy if need_y else None), None, None, None
    return backward


_library.define("checked_product_backward",
                "(Tensor dS, Tensor x, Tensor y, str x_name, str y_name, bool need_x, "
                "bool need_y) -> (Tensor, Tensor)", _product_backward_kernel,
                _product_backward_fake)
_library.define("checked_product",
                "(Tensor x, Tensor y, str x_name, str y_name, bool widen) -> Tensor",
                _product_kernel, _product_fake, autograd=(_product_backward, _product_setup))


def checked_product(x, y, names=("x", "y"), *, widen=True) -> torch.Tensor:
    """``x @ y.T`` (differentiable) after checking that both are finite, the messages
    naming them as ``names``; ``widen``: in the accumulation dtype (see :func:`product`)."""
    return _library.op("checked_product")(x, y, names[0], names[1], widen)
