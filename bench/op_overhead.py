"""The eager cost of the op boundary: the public calls timed at small sizes on the CPU.

    python bench/op_overhead.py                 # this checkout's installed package
    PYTHONPATH=/path/to/other/install python bench/op_overhead.py   # another version

Prints one JSON object: median microseconds per call of each case at N = M = 64 and 512
(D = 64 for the embedding forms), with the thread count. Compare two installs by running
both, alternately, on an otherwise idle machine (``--rounds`` repeats the whole set).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ncl_kernels as nk


def cases(n: int):
    gen = torch.Generator().manual_seed(0)
    S0 = torch.randn(n, n, generator=gen) * 0.3
    x = torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=1)
    scale = torch.tensor(10.0, requires_grad=True)
    module = nk.NCLLoss(n_iters=4)
    stream = {} if "materialize" not in nk.ncl_loss_embeddings.__code__.co_varnames \
        else {"materialize": False}

    def loss_step():
        S = S0.clone().requires_grad_()
        nk.ncl_loss(S, scale, n_iters=4).backward()

    def loss_step_inplace():
        S = S0.clone().requires_grad_()
        nk.ncl_loss(S, scale, n_iters=4, inplace_backward=True).backward()

    def embeddings_step():
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        nk.ncl_loss_embeddings(a, b, scale, n_iters=4, **stream).backward()

    def module_step():
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        module(a, b, scale).backward()

    return {
        "sinkhorn_tol_none": lambda: nk.sinkhorn(S0, 10.0, n_iters=4, tol=None),
        "ncl_loss_fwd_bwd": loss_step,
        "ncl_loss_inplace_fwd_bwd": loss_step_inplace,
        "ncl_loss_embeddings_fwd_bwd": embeddings_step,
        "NCLLoss_step": module_step,
    }


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=51)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    args = ap.parse_args()
    out = {"threads": torch.get_num_threads(), "version": nk.__version__,
           "package": nk.__file__}
    for n in args.sizes:
        for name, fn in cases(n).items():
            out[f"{name}@{n}"] = median_us(fn, args.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
