"""GPU benchmark entry points for the Triton backend, each against its roof (issue 4).

For the benchmarks' device script (``bench/`` owns the JSON files and RESULTS.md): every
function checks its result against the PyTorch backend first, then times with
``triton.testing.do_bench`` and returns one flat dict (``ok`` says whether the check
passed). ``run()`` runs the issue's target shapes; ``run(small=True)`` is a smoke test.

    python -m ncl_kernels.backends.triton.bench [--small]     # prints one JSON per line

Roofs, measured in the same process:

* dense pair (row pass + column pass): bytes = 2 reads of S; roof = device-to-device copy
  bandwidth (``copy_`` of a large buffer, bytes = read + write);
* streaming ``row_lse_xy``: flops = 2 N M D; roof = ``torch.matmul`` of the same shapes
  and dtype (its N x M output is what the streaming kernel never writes);
* streaming loss forward + backward: wall time and peak memory above the inputs, which
  must stay O((N + M) D) (no N x M buffer).
"""

from __future__ import annotations

import json
import sys

import torch

from .. import get as get_backend

#: where the benchmarks run (a dry run of the logic may point it at "cpu" under the
#: interpreter, with ``_bench_ms`` and the CUDA memory counters replaced)
DEVICE = "cuda"


def _bench_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100))


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    keep = torch.isfinite(b)
    return float((a[keep] - b[keep]).norm() / b[keep].norm().clamp(min=1e-30))


def copy_bandwidth(nbytes: int = 1 << 31) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return {"name": "copy", "bytes": 2 * nbytes, "ms": ms, "GBps": 2 * nbytes / ms / 1e6,
            "ok": True}


def matmul_rate(n: int, m: int, d: int, dtype=torch.bfloat16) -> dict:
    x = torch.randn(n, d, device=DEVICE, dtype=dtype)
    y = torch.randn(m, d, device=DEVICE, dtype=dtype)
    ms = _bench_ms(lambda: torch.matmul(x, y.T))
    return {"name": "torch.matmul", "N": n, "M": m, "D": d, "dtype": str(dtype),
            "ms": ms, "TFLOPs": 2 * n * m * d / ms / 1e9, "ok": True}


def dense_pair(n: int, m: int, dtype=torch.bfloat16, copy_GBps=None) -> dict:
    """Row pass + column pass on an N x M matrix (one Sinkhorn iteration's reads)."""
    tri, ref = get_backend("triton", torch.device(DEVICE)), get_backend("torch",
                                                                         torch.device(DEVICE))
    S = (torch.randn(n, m, device=DEVICE) * 0.3).to(dtype)
    f = torch.randn(n, device=DEVICE)
    g = torch.randn(m, device=DEVICE)
    err = max(_rel(tri.row_lse(S, 10.0, g), ref.row_lse(S, 10.0, g)),
              _rel(tri.col_lse(S, 10.0, f), ref.col_lse(S, 10.0, f)))
    ms = _bench_ms(lambda: (tri.row_lse(S, 10.0, g), tri.col_lse(S, 10.0, f)))
    nbytes = 2 * S.numel() * S.element_size()
    row = {"name": "dense row+col pass", "N": n, "M": m, "dtype": str(dtype), "ms": ms,
           "GBps": nbytes / ms / 1e6, "rel_err_vs_torch": err, "ok": err < 1e-5}
    if copy_GBps:
        row["fraction_of_copy"] = row["GBps"] / copy_GBps
    return row


def streaming_row_lse(n: int, m: int, d: int, dtype=torch.bfloat16, matmul_TFLOPs=None,
                      precision: str = "ieee") -> dict:
    tri = get_backend("triton", torch.device(DEVICE))
    ref = get_backend("torch", torch.device(DEVICE))
    x = torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(m, d, device=DEVICE), dim=1).to(dtype)
    g = torch.randn(m, device=DEVICE)
    old, tri.dot_precision = tri.dot_precision, precision
    try:
        k = min(n, 4096)  # check a slice of rows against the chunked PyTorch path
        err = _rel(tri.row_lse_xy(x[:k], y, 20.0, g), ref.row_lse_xy(x[:k], y, 20.0, g))
        ms = _bench_ms(lambda: tri.row_lse_xy(x, y, 20.0, g))
    finally:
        tri.dot_precision = old
    row = {"name": "streaming row_lse_xy", "N": n, "M": m, "D": d, "dtype": str(dtype),
           "dot_precision": precision, "ms": ms, "TFLOPs": 2 * n * m * d / ms / 1e9,
           "rel_err_vs_torch": err, "ok": err < 1e-5}
    if matmul_TFLOPs:
        row["fraction_of_matmul"] = row["TFLOPs"] / matmul_TFLOPs
    return row


def streaming_loss(n: int, m: int, d: int, dtype=torch.bfloat16, n_iters: int = 4,
                   precision: str = "ieee", grad_block_do: int = 128,
                   check: bool = True) -> dict:
    """``ncl_loss_embeddings`` forward + backward; peak memory above the inputs."""
    import ncl_kernels as nk
    tri = get_backend("triton", torch.device(DEVICE))
    x0 = torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1).to(dtype)
    y0 = torch.nn.functional.normalize(torch.randn(m, d, device=DEVICE), dim=1).to(dtype)

    def step(backend):
        x, y = x0.detach().requires_grad_(), y0.detach().requires_grad_()
        s = torch.tensor(20.0, device=DEVICE, requires_grad=True)
        loss = nk.ncl_loss_embeddings(x, y, s, n_iters=n_iters, backend=backend)
        loss.backward()
        return loss.detach(), x.grad, y.grad, s.grad

    old = tri.dot_precision, tri.grad_block_do
    tri.dot_precision, tri.grad_block_do = precision, grad_block_do
    try:
        err = float("nan")
        if check:
            k = min(n, m, 4096)
            xs, ys = x0[:k], y0[:k]
            outs = []
            for backend in ("triton", "torch"):
                xk, yk = xs.detach().requires_grad_(), ys.detach().requires_grad_()
                loss = nk.ncl_loss_embeddings(xk, yk, 20.0, n_iters=n_iters, backend=backend)
                loss.backward()
                outs.append((loss.detach(), xk.grad.float(), yk.grad.float()))
            err = max(_rel(a, b) for a, b in zip(*outs))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step("triton")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = _bench_ms(lambda: step("triton"))
    finally:
        tri.dot_precision, tri.grad_block_do = old
    inputs = (x0.numel() + y0.numel()) * x0.element_size()
    # O((N + M) D): the gradients (inputs' size), a few float32 copies, O(N + M) vectors
    budget = 4 * inputs + 64 * 4 * (n + m) + (1 << 20)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return {"name": "streaming ncl_loss_embeddings fwd+bwd", "N": n, "M": m, "D": d,
            "dtype": str(dtype), "n_iters": n_iters, "dot_precision": precision,
            "grad_block_do": grad_block_do, "ms": ms,
            "peak_bytes_above_inputs": peak, "peak_budget_bytes": budget, "input_bytes": inputs,
            "nxm_bytes_fp32": 4 * n * m, "rel_err_vs_torch": err,
            "ok": (not check or err < tol) and peak <= budget}


def run(small: bool = False):
    """The issue's target shapes (or small ones); yields one dict per measurement."""
    big_dense, big_n, d = (2048, 1024, 128) if small else (32768, 65536, 512)
    copy = copy_bandwidth(1 << (26 if small else 31))
    yield copy
    for dtype in (torch.bfloat16, torch.float32):
        yield dense_pair(big_dense, big_dense, dtype, copy_GBps=copy["GBps"])
    mm = matmul_rate(big_n, big_n, d, torch.bfloat16)
    yield mm
    yield streaming_row_lse(big_n, big_n, d, torch.bfloat16, matmul_TFLOPs=mm["TFLOPs"])
    for precision, block_do in (("ieee", 128), ("tf32x3", 128), ("tf32x3", 256)):
        yield streaming_loss(big_n, big_n, d, torch.bfloat16, precision=precision,
                             grad_block_do=block_do)


if __name__ == "__main__":
    for result in run(small="--small" in sys.argv[1:]):
        print(json.dumps(result), flush=True)
