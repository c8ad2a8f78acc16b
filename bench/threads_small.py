"""Threads on small score matrices: the C++ backend's dense passes at 1 thread vs all.

Run alone for figures (a shared machine's numbers say little); back to back, interleaved,
in one process, so the ratios are comparable even under load:

    python bench/threads_small.py [--reps 200]

For each size it prints the median time of a row pass, a column pass and a gradient pass
at 1 thread and at torch.get_num_threads() threads, and the ratio. The policy of
ncl_kernels/backends/cpu.py (one thread below SMALL_ELEMENTS) comes from this table.
"""

import argparse
import statistics
import time

import torch

from ncl_kernels.backends import cpu as cpu_backend


def _time(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _passes(cpu, n):
    """The three dense passes of the C++ backend on an n x n problem."""
    S = torch.randn(n, n)
    f, g = torch.zeros(n), torch.zeros(n)
    lse = cpu.row_lse(S, 10.0, g)
    coef = torch.full((n,), 1.0 / n)
    y = torch.arange(n)
    return {"row": lambda: cpu.row_lse(S, 10.0, g),
            "col": lambda: cpu.col_lse(S, 10.0, f),
            "grad": lambda: cpu.ncl_grad_(S, 10.0, f, g, lse, lse, coef, coef, y, y)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--sizes", default="64,128,256,384,512,768,1024,2048")
    args = p.parse_args()
    cpu = cpu_backend.CpuBackend()
    cpu_backend.SMALL_ELEMENTS = 0      # honour torch.set_num_threads at every size
    full = torch.get_num_threads()
    print(f"threads: 1 vs {full}; median of {args.reps} calls, interleaved")
    print(f"{'n x n':>12} {'pass':>6} {'1 thread':>10} {f'{full} threads':>10} {'ratio':>6}")
    for n in (int(s) for s in args.sizes.split(",")):
        passes = _passes(cpu, n)
        for name, fn in passes.items():
            times = {}
            for _ in range(3):                      # interleave the two settings
                for t in (1, full):
                    torch.set_num_threads(t)
                    times.setdefault(t, []).append(_time(fn, args.reps // 3))
            torch.set_num_threads(full)
            one, many = min(times[1]), min(times[full])
            print(f"{n:>5} x {n:<5} {name:>6} {one * 1e6:>8.1f}us {many * 1e6:>8.1f}us "
                  f"{many / one:>6.2f}")


if __name__ == "__main__":
    main()
