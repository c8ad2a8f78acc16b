"""``python -m ncl_kernels``: what is usable here, and a small example end to end."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

import ncl_kernels as nk


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ncl_kernels",
        description="Print which backends are usable here (and why not), solve Sinkhorn "
                    "on a 2000 x 2000 problem straight from the embeddings, and compare "
                    "retrieval without and with gallery biases on synthetic pairs with "
                    "hubs (seeded). The training demo is python -m ncl_kernels.train.")
    p.add_argument("--version", action="version",
                   version=f"ncl_kernels {nk.__version__} (torch {torch.__version__})")
    p.add_argument("--backends", action="store_true",
                   help="only print the backends report")
    p.add_argument("--threads", type=int,
                   help="CPU threads (torch.set_num_threads; default: PyTorch's)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    print(f"ncl_kernels {nk.__version__}, torch {torch.__version__}")
    for name, info in nk.backends().items():
        state = "usable" if info["usable"] else ("built" if info["built"] else "missing")
        print(f"  {name:7s} {state:7s} {info['why']}")
    if args.backends:
        return 0

    # Synthetic pairs with hubs: latent z; queries x = z + noise + h and items
    # y = z + noise, where the first 100 items also lean on the shared direction h that
    # every query carries, so they score high for every query (hubs).
    gen = torch.Generator().manual_seed(0)
    n, d, scale = 2000, 32, 20.0
    unit = torch.nn.functional.normalize
    h = unit(torch.randn(1, d, generator=gen), dim=1)

    def queries(count):
        z = torch.randn(count, d, generator=gen) * (4 / d ** 0.5)
        return z, unit(z + 0.5 * torch.randn(count, d, generator=gen) + h, dim=1)

    z, x = queries(n)
    y = z + 0.5 * torch.randn(n, d, generator=gen)
    y[:100] += 2.0 * h
    y = unit(y, dim=1)

    res = nk.sinkhorn_embeddings(x, y, scale)
    print(f"\nSinkhorn on {n} x {n} (streamed): {res.n_iters} iterations, "
          f"marginal error {float(res.error):.2e}")
    print(f"NCL loss {float(nk.ncl_loss_embeddings(x, y, scale)):.4f}, "
          f"CLIP loss {float(nk.ncl_loss_embeddings(x, y, scale, n_iters=0)):.4f}")

    # Test time: a bank of other queries from the same distribution gives the gallery bias.
    _, bank = queries(1000)
    targets = torch.arange(n)
    table = {}
    for method in ("none", "ncl", "qbnorm"):
        bias = None if method == "none" else nk.retrieval.gallery_bias(bank, y, scale,
                                                                       method=method)
        table[method] = nk.retrieval.metrics(nk.retrieval.ranks(x, y, targets, scale,
                                                                bias=bias))
    print("\ntext-to-video retrieval (2000 queries, 2000 items, 100 of them hubs):")
    print(nk.retrieval.format_metrics(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
