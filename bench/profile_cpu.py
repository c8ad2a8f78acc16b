"""Side-by-side timing of the C++ CPU backend against the CPU-backend issue's targets.

    python bench/profile_cpu.py [--skip-compile] [--skip-pot] [--repeat 5] [--threads N]
                                [--cases 1,2,3]

Everything is measured in this one process, alternating the contenders each round (this
machine is shared and noisy: read the ratios, not the absolute times); each time is the
best of ``--repeat`` rounds. Memory peaks are measured in child processes (growth of the
peak RSS, VmHWM, with glibc's mmap threshold fixed so that freed buffers leave the RSS).

Cases (the issue's targets):
 1. N = M = 4096 float32, one Sinkhorn iteration (a row and a column pass): ours vs the
    torch backend, the eager two-logsumexp loop, torch.compile of it, POT sinkhorn_log, and
    the floor (two reads of S at the read bandwidth measured here).
 2. ncl_loss forward + backward, 4096 x 4096 float32, n_iters=4, inplace_backward=True:
    time vs (2 n_iters + 2) passes at our measured per-pass time; peak memory beyond S.
 3. sinkhorn_embeddings N = M = 8192, D = 128, 4 iterations: time vs 8 torch.matmul of the
    same shape; peak memory vs the materialized path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time

import torch

import ncl_kernels as nk
from ncl_kernels.backends import get

SCALE = 10.0
# the environment as it was at start: torch.compile and POT's imports add variables that
# the memory children should not inherit
_ENV = dict(os.environ)


def best_times(fns: dict, repeat: int) -> dict:
    """Best wall time of each callable, alternating them round by round."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def read_bandwidth(repeat: int) -> float:
    buf = torch.ones(64 << 20)  # 256 MiB, as bench/conftest.py measures it
    buf.sum()
    t = best_times({"sum": buf.sum}, repeat)["sum"]
    return buf.numel() * 4 / t


def scores(n, m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, 64, generator=gen), dim=1)
    return x @ y.T


def eager_iteration(S, scale):
    """The obvious PyTorch loop (bench/test_bench_sinkhorn.py's): two logsumexp passes."""
    L = scale * S
    g = torch.zeros(S.shape[1])
    f = -torch.logsumexp(L + g, 1)
    g = torch.log(torch.tensor(S.shape[0] / S.shape[1])) - torch.logsumexp(L + f[:, None], 0)
    return f, g


def child_peak_mib(code: str) -> float:
    env = dict(_ENV, MALLOC_MMAP_THRESHOLD_="1048576")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=1200, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return float(done.stdout.strip().splitlines()[-1])  # the child prints the growth last


# Peak RSS from /proc/self/status VmHWM (MiB). Not getrusage's ru_maxrss: Linux carries the
# parent's peak over into a child across fork + exec, which would hide the child's growth
# whenever this (large) parent process has a higher peak.
PEAK = """
    import torch, ncl_kernels as nk
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
"""


def case_iteration(args):
    n = 4096
    S = scores(n, n)
    cpu, tb = get("cpu", S.device), get("torch", S.device)
    g0 = torch.zeros(n)
    f0 = -cpu.row_lse(S, SCALE, g0)

    def ours():  # steady state of one iteration: a column pass and a row pass
        cpu.row_lse(S, SCALE, cpu.col_lse(S, SCALE, f0))

    def torch_backend():
        tb.row_lse(S, SCALE, tb.col_lse(S, SCALE, f0))

    fns = {"cpu backend (col + row pass)": ours,
           "torch backend (col + row pass)": torch_backend,
           "nk.sinkhorn(n_iters=1), cpu, incl. validation + opening row pass":
               lambda: nk.sinkhorn(S, SCALE, n_iters=1, tol=None, backend="cpu"),
           "eager two-logsumexp loop": lambda: eager_iteration(S, SCALE)}
    if not args.skip_compile:
        compiled = torch.compile(eager_iteration)
        t0 = time.perf_counter()
        compiled(S, SCALE)
        compiled(S, SCALE)
        print(f"  (torch.compile warm-up {time.perf_counter() - t0:.1f} s)")
        fns["torch.compile(eager loop)"] = lambda: compiled(S, SCALE)
    if not args.skip_pot:
        try:
            import ot
            a = torch.ones(n, dtype=torch.float64)
            cost = -S.double()
            fns["POT sinkhorn_log, numItermax=1"] = lambda: ot.sinkhorn(
                a, a, cost, 1.0 / SCALE, method="sinkhorn_log", numItermax=1, stopThr=0.0)
        except ImportError:
            print("  (POT not installed)")
    bw = read_bandwidth(args.repeat)
    t = best_times(fns, args.repeat)
    floor = 2 * S.numel() * 4 / bw
    ref = t["cpu backend (col + row pass)"]
    print(f"\n1. one Sinkhorn iteration, {n} x {n} float32 (read bandwidth {bw / 1e9:.1f} GB/s,"
          f" floor = 2 reads = {floor * 1e3:.2f} ms)")
    for name, v in t.items():
        print(f"  {name:66s} {v * 1e3:8.2f} ms   {v / ref:6.2f}x ours")
    print(f"  {'floor (2 reads of S)':66s} {floor * 1e3:8.2f} ms   ours = {ref / floor:.2f}x floor")
    return t, floor


def case_loss(args):
    n, iters = 4096, 4
    S0 = scores(n, n, seed=1)
    cpu = get("cpu", S0.device)
    g = torch.randn(n)
    f = torch.randn(n)

    def loss_step():
        S = S0.clone()  # the caller gives S up with inplace_backward=True
        t0 = time.perf_counter()
        S.requires_grad_()
        nk.ncl_loss(S, SCALE, n_iters=iters, inplace_backward=True, backend="cpu").backward()
        loss_step.t = time.perf_counter() - t0

    def row_pass():
        cpu.row_lse(S0, SCALE, g)

    def col_pass():
        cpu.col_lse(S0, SCALE, f)

    best = {"loss": float("inf"), "row": float("inf"), "col": float("inf")}
    for _ in range(args.repeat):
        loss_step()
        best["loss"] = min(best["loss"], loss_step.t)  # excludes the clone
        best["row"] = min(best["row"], best_times({"r": row_pass}, 1)["r"])
        best["col"] = min(best["col"], best_times({"c": col_pass}, 1)["c"])
    passes = 2 * iters + 2
    budget_row = passes * best["row"]
    budget_mean = passes * (best["row"] + best["col"]) / 2
    peak = child_peak_mib(PEAK + f"""
    n = {n}
    S = torch.empty(n, n).normal_().mul_(0.3)   # no temporary: the RSS peak so far is S
    w = torch.empty(256, 256).normal_().requires_grad_()
    nk.ncl_loss(w, {SCALE}, n_iters={iters}, inplace_backward=True, backend="cpu").backward()
    S.requires_grad_()
    before = rss()
    nk.ncl_loss(S, {SCALE}, n_iters={iters}, inplace_backward=True, backend="cpu").backward()
    print("grad shares S storage:", S.grad.data_ptr() == S.data_ptr())
    print(rss() - before)
    """)
    s_mib = n * n * 4 / 2**20
    print(f"\n2. ncl_loss fwd + bwd, {n} x {n} float32, n_iters={iters}, inplace_backward=True")
    print(f"  time {best['loss'] * 1e3:.1f} ms; our row pass {best['row'] * 1e3:.2f} ms, column"
          f" pass {best['col'] * 1e3:.2f} ms")
    print(f"  budget {passes} row passes = {budget_row * 1e3:.1f} ms -> "
          f"{best['loss'] / budget_row:.2f}x;"
          f" {passes} mean(row, col) passes = {budget_mean * 1e3:.1f} ms -> "
          f"{best['loss'] / budget_mean:.2f}x")
    print(f"  peak memory beyond S: {peak:.1f} MiB = {100 * peak / s_mib:.2f}% of S "
          f"({s_mib:.0f} MiB)")


def case_embeddings(args):
    n, d, iters = 8192, 128, 4
    gen = torch.Generator().manual_seed(2)
    X = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    Y = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    def stream():
        nk.sinkhorn_embeddings(X, Y, SCALE, n_iters=iters, tol=None, backend="cpu")

    def matmuls():
        for _ in range(2 * iters):
            X @ Y.T

    t = best_times({"stream": stream, "8 matmul": matmuls}, max(2, args.repeat // 2))
    common = PEAK + f"""
    gen = torch.Generator().manual_seed(2)
    X = torch.nn.functional.normalize(torch.randn({n}, {d}, generator=gen), dim=1)
    Y = torch.nn.functional.normalize(torch.randn({n}, {d}, generator=gen), dim=1)
    nk.sinkhorn_embeddings(X[:512], Y[:512], {SCALE}, n_iters=1, tol=None, backend="cpu")
    nk.sinkhorn(X[:512] @ Y[:512].T, {SCALE}, n_iters=1, tol=None, backend="cpu")
    before = rss()
    """
    peak_stream = child_peak_mib(common + f"""
    nk.sinkhorn_embeddings(X, Y, {SCALE}, n_iters={iters}, tol=None, backend="cpu")
    print(rss() - before)
    """)
    peak_dense = child_peak_mib(common + f"""
    nk.sinkhorn(X @ Y.T, {SCALE}, n_iters={iters}, tol=None, backend="cpu")
    print(rss() - before)
    """)
    print(f"\n3. sinkhorn_embeddings N = M = {n}, D = {d}, {iters} iterations")
    print(f"  streaming {t['stream'] * 1e3:.0f} ms; 8 x matmul ({n}x{d} @ {d}x{n}) "
          f"{t['8 matmul'] * 1e3:.0f} ms -> {t['stream'] / t['8 matmul']:.2f}x")
    ratio = f"{peak_stream / peak_dense:.3f}" if peak_dense > 0 else "n/a"
    print(f"  peak memory growth: streaming {peak_stream:.0f} MiB, materialized "
          f"{peak_dense:.0f} MiB -> {ratio}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-pot", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cases", default="1,2,3")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from ncl_kernels import _C_cpu
    info = _C_cpu.build_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; _C_cpu kernels "
          f"{info['isa']} (available {info['available_isas']}), OpenMP {info['openmp']}")
    cases = {"1": case_iteration, "2": case_loss, "3": case_embeddings}
    for c in args.cases.split(","):
        cases[c](args)


if __name__ == "__main__":
    main()
