"""Time alternatives to the shipped Triton launch table (configs.py) on a GPU.

No autotuning ships: the table is revised from these measurements. Each candidate is
checked against the shipped entry's result (same function; the LSE passes to float32
rounding, the gradient to its precision) before it is timed; the shipped entry is the
first row of each group. One JSON line per candidate:

    python bench/triton_sweep.py [--out FILE] [--only stream|grad|dense]
    TRITON_INTERPRET=1 python bench/triton_sweep.py --dry     # the logic on CPU, untimed
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import triton_entry as E

from ncl_kernels.backends.triton import configs

STREAM = [  # (block_n, block_m, block_d, warps, stages); the first is the shipped entry
    None, (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 4), (128, 128, 128, 8, 2), (64, 128, 64, 4, 4)]
GRAD = [  # (own, stream, block_do, warps, stages) for 16-bit D = 512
    None, (128, 32, 128, 8, 3), (128, 64, 128, 8, 2), (64, 64, 256, 4, 2),
    (128, 32, 256, 8, 1)]
DENSE_ROW = [None, (8, 512, 8, 3), (32, 256, 8, 3), (16, 1024, 8, 3), (16, 512, 4, 4)]
DENSE_COL = [None, (32, 1024, 4, 3), (8, 1024, 4, 3), (16, 512, 4, 3), (16, 1024, 8, 3)]


@contextlib.contextmanager
def table(name, fn):
    old = getattr(configs, name)
    setattr(configs, name, fn)
    try:
        yield
    finally:
        setattr(configs, name, old)


def failed(what, cand, exc) -> dict:
    """A candidate that does not fit (shared memory, registers) is reported, not fatal."""
    return {"name": f"sweep {what}", "tiles": cand, "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:300]}


def sweep_stream(n, d, dtype):
    x, y = E._embeddings(n, n, d, dtype)
    g = torch.randn(n, device=E.DEVICE)
    shipped = E.triton_backend().row_lse_xy(x, y, 20.0, g)
    for cand in STREAM:
        fn = configs.stream_tiles if cand is None else \
            (lambda dt, dd, cap=None, c=cand: configs.StreamTiles(*c))
        try:
            with table("stream_tiles", fn):
                be = E.triton_backend()
                err = E._rel(be.row_lse_xy(x, y, 20.0, g), shipped)
                ms = E._bench_ms(lambda be=be: be.row_lse_xy(x, y, 20.0, g))
        except Exception as exc:  # noqa: BLE001 - a candidate that does not fit
            yield failed("row_lse_xy", cand, exc)
            continue
        yield {"name": "sweep row_lse_xy", "N": n, "D": d, "dtype": str(dtype),
               "tiles": cand or "shipped", "ms": ms, "TFLOPs": 2 * n * n * d / ms / 1e9,
               "rel_err_vs_shipped": err, "ok": err < 1e-5}


def sweep_grad(n, d, dtype):
    x, y = E._embeddings(n, n, d, dtype)
    args = E._grad_inputs(x, y, 20.0)
    shipped = E.triton_backend().ncl_grad_xy(x, y, 20.0, *args)
    for cand in GRAD:
        fn = configs.grad_tiles if cand is None else \
            (lambda dt, dd, cap=None, c=cand: configs.GradTiles(
                c[0], c[1], configs.stream_tiles(dt, dd).block_d, c[2], True, c[3], c[4]))
        try:
            with table("grad_tiles", fn):
                be = E.triton_backend()
                out = be.ncl_grad_xy(x, y, 20.0, *args)
                err = max(E._rel(out[0].float(), shipped[0].float()),
                          E._rel(out[1].float(), shipped[1].float()))
                ms = E._bench_ms(lambda be=be: be.ncl_grad_xy(x, y, 20.0, *args))
        except Exception as exc:  # noqa: BLE001
            yield failed("ncl_grad_xy", cand, exc)
            continue
        yield {"name": "sweep ncl_grad_xy", "N": n, "D": d, "dtype": str(dtype),
               "tiles": cand or "shipped", "ms": ms, "rel_err_vs_shipped": err,
               "ok": err < 1e-2}


def sweep_dense(n, dtype):
    S = (torch.randn(n, n, device=E.DEVICE) * 0.3).to(dtype)
    v = torch.randn(n, device=E.DEVICE)
    for name, cands, method in (("row_tiles", DENSE_ROW, "row_lse"),
                                ("col_tiles", DENSE_COL, "col_lse")):
        shipped = getattr(E.triton_backend(), method)(S, 10.0, v)
        for cand in cands:
            fn = getattr(configs, name) if cand is None else \
                (lambda dt, m, cap=None, c=cand: configs.DenseTiles(*c))
            try:
                with table(name, fn):
                    call = getattr(E.triton_backend(), method)
                    err = E._rel(call(S, 10.0, v), shipped)
                    ms = E._bench_ms(lambda call=call: call(S, 10.0, v))
            except Exception as exc:  # noqa: BLE001
                yield failed(method, cand, exc)
                continue
            yield {"name": f"sweep {method}", "N": n, "dtype": str(dtype),
                   "tiles": cand or "shipped", "ms": ms,
                   "GBps": S.numel() * S.element_size() / ms / 1e6,
                   "rel_err_vs_shipped": err, "ok": err < 1e-5}


def run(only=None):
    n, d, dense = (160, 40, 96) if E.DRY else (32768, 512, 32768)
    if only in (None, "stream"):
        yield from sweep_stream(2 * n if not E.DRY else n, d, torch.bfloat16)
    if only in (None, "grad"):
        yield from sweep_grad(n, d, torch.bfloat16)
    if only in (None, "dense"):
        yield from sweep_dense(dense, torch.bfloat16)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--dry" in argv:
        E.DRY, E.DEVICE = True, "cpu"
    out = open(argv[argv.index("--out") + 1], "a") if "--out" in argv else None
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    for row in run(only):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
