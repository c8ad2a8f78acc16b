"""Where the low-precision gradient pass spends its time on the CPU.

    python bench/grad_store_cost.py [--n 4096] [--repeat 7]

For each storage dtype, one thread, best of ``--repeat`` rounds (the three cases
alternated, as bench/profile_cpu.py times them, on its scores): the C++ gradient pass
writing its output, the same pass without an output (so the difference is the cost of
converting and storing ``scale * G``), and a row LSE pass for scale. bench/RESULTS.md has
a run.
"""

from __future__ import annotations

import argparse

import torch
from profile_cpu import best_times, scores

from ncl_kernels.backends import get

SCALE = 20.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.n
    gen = torch.Generator().manual_seed(3)
    S32 = scores(n, n, seed=3)   # case 2's matrix
    cpu = get("cpu", S32.device)
    g, f = torch.zeros(n), torch.randn(n, generator=gen) * 0.1
    lse_row, lse_col = cpu.row_lse(S32, SCALE, g), cpu.col_lse(S32, SCALE, f)
    y, coef = torch.arange(n), torch.full((n,), 0.5 / n)
    print(f"{n} x {n}, 1 thread, best of {args.repeat}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        S, out = S32.to(dtype), torch.empty(n, n, dtype=dtype)

        def grad(target, S=S):
            cpu.ncl_grad_(S, SCALE, f, g, lse_row, lse_col, coef, coef, y, y, out=target)

        grad(out)   # warm-up: the output's pages, the kernels' scratch
        t = best_times({"written": lambda out=out: grad(out), "alone": lambda: grad(None),
                        "row": lambda S=S: cpu.row_lse(S, SCALE, g)}, args.repeat)
        written, alone, row = (t[k] * 1e3 for k in ("written", "alone", "row"))
        print(f"  {str(dtype)[6:]:9s} gradient written {written:6.2f} ms, without output "
              f"{alone:6.2f} ms (store {written - alone:5.2f} ms); row pass {row:6.2f} ms")


if __name__ == "__main__":
    main()
