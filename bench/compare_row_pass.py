"""Side-by-side timing of the row-LSE primitive on every usable CPU backend.

    python bench/compare_row_pass.py

Alternates the backends in one process (this machine is noisy: ratios hold, absolute
times do not) and prints the best of 5 rounds of 3 calls per case. The numbers decide
which backend ``backend="auto"`` picks on CPU tensors.
"""

import time

import torch

import ncl_kernels as nk
from ncl_kernels.backends import get


def main():
    names = [b for b in ("torch", "cpu") if nk.backends()[b]["usable"]]
    impls = {name: get(name, torch.device("cpu")) for name in names}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n in (512, 2048, 4096):
            S = torch.randn(n, n).to(dtype)
            g = torch.randn(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            best = {}
            for _ in range(5):
                for name, be in impls.items():
                    start = time.perf_counter()
                    for _ in range(3):
                        be.row_lse(S, 10.0, g)
                    best[name] = min(best.get(name, float("inf")),
                                     (time.perf_counter() - start) / 3)
            line = "  ".join(f"{k} {v * 1e3:7.2f} ms" for k, v in best.items())
            ratio = f"  cpu/torch {best['cpu'] / best['torch']:.2f}" if "cpu" in best else ""
            print(f"{str(dtype)[6:]:9s} {n:5d}x{n:<5d} {line}{ratio}")


if __name__ == "__main__":
    main()
