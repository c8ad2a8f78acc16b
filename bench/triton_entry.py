"""GPU measurements of the Triton backend's kernels, each against its roof (issue 19).

Every function checks its result first (against the PyTorch backend, or a second Triton
path), then times with ``triton.testing.do_bench`` (median) and returns one flat dict
(``ok`` says whether the check passed). Configured backends are built here, never by
changing the registry's shared instance (the public-API cases install one for the call
and put the shared one back).

    python bench/triton_entry.py [--small] [--out FILE]   # one JSON line per measurement
    TRITON_INTERPRET=1 python bench/triton_entry.py --dry  # the logic on CPU, tiny, untimed

Roofs, measured in the same process: device-to-device copy (bytes read + written) for
the dense passes, ``torch.matmul`` of the same shape and dtype for the streaming ones
(flops ``2 N M D`` per product; its N x M output is what the streaming kernels never
write). Cases (``--small``: shapes that run in seconds, for a dry run of the logic):

* dense row + column pass (one Sinkhorn iteration's reads), bfloat16 and float32;
* ``row_lse_xy`` and ``col_lse_xy`` (one product each);
* one Sinkhorn iteration: the fused step (``sinkhorn_step_xy``) against the two passes;
* ``ncl_grad_xy`` with the gradient tile split (two products) and rounded once;
* ``ncl_loss_embeddings`` forward + backward (4 iterations), peak memory above inputs.
"""

from __future__ import annotations

import json
import sys
from typing import Iterator

import torch

DEVICE = "cuda"
DRY = False      # --dry: CPU tensors in Triton's interpreter, each case run once, untimed


def _bench_ms(fn) -> float:
    if DRY:
        fn()
        return float("nan")
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _memory(what: str) -> int:
    if DRY:
        return 0
    if what == "reset":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() if what == "now" else torch.cuda.max_memory_allocated()


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    keep = torch.isfinite(b)
    return float((a[keep] - b[keep]).norm() / b[keep].norm().clamp(min=1e-30))


def triton_backend(**config):
    from ncl_kernels.backends.triton.backend import TritonBackend
    return TritonBackend(**config)


def torch_backend():
    from ncl_kernels.backends import get
    return get("torch", torch.device(DEVICE))


def installed(be):
    """``backend="triton"`` in the public API runs ``be`` inside the block."""
    from ncl_kernels.backends import replaced
    return replaced("triton", be)


def _embeddings(n, m, d, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d, device=DEVICE, generator=gen), dim=1)
    return x.to(dtype), y.to(dtype)


def copy_bandwidth(nbytes: int) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return {"name": "copy", "bytes": 2 * nbytes, "ms": ms, "GBps": 2 * nbytes / ms / 1e6,
            "ok": True}


def matmul_rate(n, m, d, dtype=torch.bfloat16) -> dict:
    x, y = _embeddings(n, m, d, dtype)
    ms = _bench_ms(lambda: torch.matmul(x, y.T))
    return {"name": "torch.matmul", "N": n, "M": m, "D": d, "dtype": str(dtype), "ms": ms,
            "TFLOPs": 2 * n * m * d / ms / 1e9, "ok": True}


def dense_pair(n, m, dtype, copy_GBps) -> dict:
    tri, ref = triton_backend(), torch_backend()
    S = (torch.randn(n, m, device=DEVICE) * 0.3).to(dtype)
    f, g = torch.randn(n, device=DEVICE), torch.randn(m, device=DEVICE)
    err = max(_rel(tri.row_lse(S, 10.0, g), ref.row_lse(S, 10.0, g)),
              _rel(tri.col_lse(S, 10.0, f), ref.col_lse(S, 10.0, f)))
    rows = {}
    for name, fn in (("row", lambda: tri.row_lse(S, 10.0, g)),
                     ("col", lambda: tri.col_lse(S, 10.0, f)),
                     ("pair", lambda: (tri.row_lse(S, 10.0, g), tri.col_lse(S, 10.0, f)))):
        rows[name] = _bench_ms(fn)
    one = S.numel() * S.element_size()
    return {"name": "dense row/col pass", "N": n, "M": m, "dtype": str(dtype),
            "row_ms": rows["row"], "col_ms": rows["col"], "pair_ms": rows["pair"],
            "row_of_copy": one / rows["row"] / 1e6 / copy_GBps,
            "col_of_copy": one / rows["col"] / 1e6 / copy_GBps,
            "pair_of_copy": 2 * one / rows["pair"] / 1e6 / copy_GBps,
            "rel_err_vs_torch": err, "ok": err < 1e-5}


def streaming_lse(n, m, d, dtype, matmul_TFLOPs) -> dict:
    tri, ref = triton_backend(), torch_backend()
    x, y = _embeddings(n, m, d, dtype)
    g, f = torch.randn(m, device=DEVICE), torch.randn(n, device=DEVICE)
    k = min(n, m, 4096)  # check a slice against the chunked PyTorch path
    err = max(_rel(tri.row_lse_xy(x[:k], y, 20.0, g), ref.row_lse_xy(x[:k], y, 20.0, g)),
              _rel(tri.col_lse_xy(x, y[:k], 20.0, f), ref.col_lse_xy(x, y[:k], 20.0, f)))
    row = _bench_ms(lambda: tri.row_lse_xy(x, y, 20.0, g))
    col = _bench_ms(lambda: tri.col_lse_xy(x, y, 20.0, f))
    flops = 2 * n * m * d
    return {"name": "streaming row/col LSE", "N": n, "M": m, "D": d, "dtype": str(dtype),
            "row_ms": row, "col_ms": col, "row_TFLOPs": flops / row / 1e9,
            "col_TFLOPs": flops / col / 1e9,
            "row_of_matmul": flops / row / 1e9 / matmul_TFLOPs,
            "rel_err_vs_torch": err, "ok": err < 1e-5}


def fused_step(n, m, d, dtype, matmul_TFLOPs) -> dict:
    """One Sinkhorn iteration: ``sinkhorn_step_xy`` (one launch + a merge) against the
    two passes it replaces (row LSE, the potential, column LSE)."""
    tri = triton_backend()
    x, y = _embeddings(n, m, d, dtype)
    g = torch.randn(m, device=DEVICE)
    log_r = torch.zeros(n, device=DEVICE)

    def two_pass():  # (f, lse_row, lse_col), the order of the seam's sinkhorn_step_xy
        lse = tri.row_lse_xy(x, y, 20.0, g)
        f = log_r - lse
        return f, lse, tri.col_lse_xy(x, y, 20.0, f)

    a, b = tri.sinkhorn_step_xy(x, y, 20.0, g, log_r), two_pass()
    err = _rel(a[2], b[2])
    same = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    fused_ms = _bench_ms(lambda: tri.sinkhorn_step_xy(x, y, 20.0, g, log_r))
    two_ms = _bench_ms(two_pass)
    flops = 2 * 2 * n * m * d
    return {"name": "Sinkhorn iteration: fused vs two passes", "N": n, "M": m, "D": d,
            "dtype": str(dtype), "fused_ms": fused_ms, "two_pass_ms": two_ms,
            "fused_TFLOPs": flops / fused_ms / 1e9,
            "fused_of_matmul": flops / fused_ms / 1e9 / matmul_TFLOPs,
            "speedup": two_ms / fused_ms, "row_bits_equal": same,
            "lse_col_rel_err": err, "ok": same and err < 1e-5}


def _grad_inputs(x, y, scale):
    tri = triton_backend()
    n, m = x.shape[0], y.shape[0]
    g = torch.zeros(m, device=DEVICE)
    lse_row = tri.row_lse_xy(x, y, scale, g)
    f = -lse_row
    lse_col = tri.col_lse_xy(x, y, scale, f)
    g = torch.log(torch.full_like(lse_col, n / m)) - lse_col
    lse_row = tri.row_lse_xy(x, y, scale, g)
    ar = torch.arange(n, device=DEVICE)
    y_t, z_t = ar % m, torch.arange(m, device=DEVICE) % n
    cr = torch.full((n,), 0.5 / n, device=DEVICE)
    cc = torch.full((m,), 0.5 / m, device=DEVICE)
    return f, g, lse_row, lse_col, cr, cc, y_t, z_t


def streaming_grad(n, m, d, dtype, matmul_TFLOPs, split: bool) -> dict:
    tri = triton_backend(grad_split=split)
    x, y = _embeddings(n, m, d, dtype)
    args = _grad_inputs(x, y, 20.0)
    k = min(n, m, 2048)
    small = tuple(v[:k] for v in args)
    ours = tri.ncl_grad_xy(x[:k], y[:k], 20.0, *small)
    ref = torch_backend().ncl_grad_xy(x[:k], y[:k], 20.0, *small)
    err = max(_rel(ours[0].float(), ref[0].float()), _rel(ours[1].float(), ref[1].float()))
    ms = _bench_ms(lambda: tri.ncl_grad_xy(x, y, 20.0, *args))
    from ncl_kernels.backends.triton import configs
    t = configs.grad_tiles(dtype, d)
    blocks = -(-d // t.block_do)
    # S formed once per output block in each kernel, then one or two G products each
    products = 2 * blocks + 2 * (2 if split and dtype != torch.float32 else 1)
    flops = products * 2 * n * m * d
    useful = 3 * 2 * n * m * d  # the count: 3 products (S once, dX, dY)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return {"name": "ncl_grad_xy", "N": n, "M": m, "D": d, "dtype": str(dtype),
            "split": split, "S_formed_per_kernel": blocks, "ms": ms,
            "TFLOPs_done": flops / ms / 1e9, "TFLOPs_useful_3_products": useful / ms / 1e9,
            "useful_of_matmul": useful / ms / 1e9 / matmul_TFLOPs,
            "rel_err_vs_torch": err, "ok": err < tol}


def streaming_loss(n, m, d, dtype, n_iters=4, check=True, **config) -> dict:
    """``ncl_loss_embeddings`` forward + backward; peak memory above the inputs."""
    import ncl_kernels as nk
    x0, y0 = _embeddings(n, m, d, dtype)

    def step(backend, x_, y_):
        x, y = x_.detach().requires_grad_(), y_.detach().requires_grad_()
        s = torch.tensor(20.0, device=DEVICE, requires_grad=True)
        loss = nk.ncl_loss_embeddings(x, y, s, n_iters=n_iters, backend=backend)
        loss.backward()
        return loss.detach(), x.grad, y.grad, s.grad

    with installed(triton_backend(**config)):
        err = float("nan")
        if check:
            k = min(n, m, 4096)
            a, b = step("triton", x0[:k], y0[:k]), step("torch", x0[:k], y0[:k])
            err = max(_rel(u.float(), v.float()) for u, v in zip(a, b))
        base = _memory("now")
        _memory("reset")
        step("triton", x0, y0)
        peak = _memory("peak") - base
        ms = _bench_ms(lambda: step("triton", x0, y0))
    inputs = (x0.numel() + y0.numel()) * x0.element_size()
    budget = 4 * inputs + 64 * 4 * (n + m) + (1 << 20) + 8 * 264 * max(n, m)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return {"name": "ncl_loss_embeddings fwd+bwd", "N": n, "M": m, "D": d,
            "dtype": str(dtype), "n_iters": n_iters, "config": config, "ms": ms,
            "peak_bytes_above_inputs": peak, "peak_budget_bytes": budget,
            "nxm_bytes_fp32": 4 * n * m, "rel_err_vs_torch": err,
            "ok": (not check or err < tol) and peak <= budget}


def run(small: bool = False) -> Iterator[dict]:
    """The issue's target shapes (or small ones); yields one dict per measurement."""
    dense, big, loss_n, d = (2048, 2048, 2048, 128) if small else (32768, 65536, 32768, 512)
    if DRY:
        dense, big, loss_n, d = 96, 160, 96, 40
    copy = copy_bandwidth(1 << (12 if DRY else 26 if small else 31))
    yield copy
    mm = matmul_rate(big, big, d)
    yield mm
    yield streaming_lse(big, big, d, torch.bfloat16, mm["TFLOPs"])
    yield fused_step(big, big, d, torch.bfloat16, mm["TFLOPs"])
    for split in (True, False):
        yield streaming_grad(loss_n, loss_n, d, torch.bfloat16, mm["TFLOPs"], split)
    for split in (True, False):
        yield streaming_loss(loss_n, loss_n, d, torch.bfloat16, grad_split=split)
    for dtype in (torch.bfloat16, torch.float32):
        yield dense_pair(dense, dense, dtype, copy["GBps"])
    if not small and not DRY:
        yield streaming_loss(2 * loss_n, 2 * loss_n, d, torch.bfloat16, check=False)
        mm32 = matmul_rate(8192, 8192, d, torch.float32)
        yield mm32
        yield streaming_lse(16384, 16384, d, torch.float32, mm32["TFLOPs"])


if __name__ == "__main__":
    if "--dry" in sys.argv[1:]:
        DRY, DEVICE, small = True, "cpu", True
    out = None
    if "--out" in sys.argv:
        out = open(sys.argv[sys.argv.index("--out") + 1], "a")
    for result in run(small=DRY or "--small" in sys.argv[1:]):
        line = json.dumps(result)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
