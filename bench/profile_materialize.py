"""Measure the per-element costs of ``ncl_kernels/_materialize.py``'s model on this device.

    python bench/profile_materialize.py [--device cpu|cuda] [--n 2048] [--d 128] [--dtype f32]

Prints the four numbers of a ``Costs`` entry (median of repeats, after a warm-up), and the
model's verdict next to the measured time of both forms of a 4-iteration loss step, so the
table can be checked against reality. Measure alone on the machine (no other load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ncl_kernels as nk
from ncl_kernels import _materialize as M
from ncl_kernels.backends import get

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=7):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    args = ap.parse_args()
    device, dtype, n, d = torch.device(args.device), DTYPES[args.dtype], args.n, args.d
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype)
    be = get("auto", device)
    elems = n * n
    S = M.product(x, y)
    t_stream = timed(lambda: be.row_lse_xy(x, y, 20.0, None), device)
    t_product = timed(lambda: M.product(x, y), device)
    t_pass = timed(lambda: be.row_lse(S, 20.0, None), device)
    t_write = timed(lambda: S.fill_(0.5), device)
    costs = M.Costs(stream_flops=2 * elems * d / t_stream, product_flops=2 * elems * d / t_product,
                    dense_pass=t_pass / elems, write=t_write / elems)
    print(f"{device.type} {args.dtype} n={n} d={d} threads={torch.get_num_threads()}")
    print(f"  {costs}")

    def step(materialize):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        nk.ncl_loss_embeddings(a, b, 20.0, materialize=materialize).backward()

    measured = {m: timed(lambda m=m: step(m), device, repeats=5) for m in (False, True)}
    stream, formed = M.estimate(n, n, d, dtype, device.type, 9, True) or (None, None)
    print(f"  loss step, 4 iterations: streaming {measured[False] * 1e3:.1f} ms, formed "
          f"{measured[True] * 1e3:.1f} ms; the table's model says "
          + ("n/a" if stream is None else f"{stream * 1e3:.1f} vs {formed * 1e3:.1f} ms"))


if __name__ == "__main__":
    main()
