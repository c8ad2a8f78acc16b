"""Side-by-side timing of the C++ CPU backend against the CPU-backend issues' targets.

    python bench/profile_cpu.py [--skip-compile] [--skip-pot] [--repeat 5] [--threads N]
                                [--cases 1,2,3]

Everything is measured in this one process, alternating the contenders each round (on a
shared machine read the ratios, not the absolute times); each time is the best of
``--repeat`` rounds. The roofs are measured in the same run by the C++ module's own
kernels: the read bandwidth (``_C_cpu.read_sum``) and the exp throughput
(``_C_cpu.exp_sum``: the exp-sum sweep of an LSE pass alone, every thread). Memory peaks
are measured in child processes (growth of the peak RSS, VmHWM, with glibc's mmap
threshold fixed so that freed buffers leave the RSS). Each case ends with lines
``TARGET ... ok/MISSED`` that state the target and the measured ratio.

Cases:
 1. One Sinkhorn iteration, N = M = 4096 float32 (docs/math.md section 2). Ours is the
    fused step (``CpuBackend.sinkhorn_step``: one read of S, one exponential per
    element); also timed: the same iteration as a column and a row pass, the current
    driver (``nk.sinkhorn(n_iters=1)``), the torch backend, the eager two-logsumexp loop,
    torch.compile of it and POT. Targets: >= 3x torch.compile, >= 20x eager, within 1.3x
    of the exp floor (2 N M exponentials, the two LSEs of the math, at the measured rate).
 2. bfloat16 / float16 storage against float32, per element, for the fused step and the
    row, column and gradient passes: target <= 1.0x float32's time.
 3. ncl_loss forward + backward, 4096 x 4096 float32, n_iters=4, inplace_backward=True:
    time vs 10 of our row passes (target <= 1x), and the same loss as the sequence of
    kernels it costs once the driver runs on sinkhorn_step (4 steps, the closing row pass,
    the in-place gradient pass); peak memory beyond S (target <= 5% of S).
 4. sinkhorn_embeddings N = M = 8192, D = 128, 4 iterations, streaming
    (``materialize=False``): time vs 8 torch.matmul of the same shape (target <= 1.15x);
    peak memory vs the materialized path (target <= 1/4); the default policy's time beside
    it (not run by default).
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


def native_roofs(repeat: int) -> dict:
    """Read bandwidth (bytes/s) and exp rate (exp/s) by ``_C_cpu``'s roof kernels."""
    from ncl_kernels import _C_cpu

    threads = torch.get_num_threads()
    buf = torch.rand(64 << 20)  # 256 MiB, far beyond the caches
    x = torch.rand(2048) * 20 - 20  # L1-resident, the argument range of an LSE sweep
    reps = 2000
    t = best_times({
        "read": lambda: _C_cpu.read_sum(buf.data_ptr(), buf.numel(), threads),
        "exp": lambda: _C_cpu.exp_sum(x.data_ptr(), x.numel(), 0.0, reps, threads),
    }, repeat)
    return {"read": buf.numel() * 4 / t["read"], "exp": x.numel() * reps * threads / t["exp"]}


def target(what: str, value: float, bound: float, at_most: bool = True) -> None:
    ok = value <= bound if at_most else value >= bound
    print(f"  TARGET {what}: {value:.2f} ({'<=' if at_most else '>='} {bound:g}) "
          f"{'ok' if ok else 'MISSED'}")


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
    g0, log_r = torch.zeros(n), torch.zeros(n)
    f0 = -cpu.row_lse(S, SCALE, g0)

    fns = {"ours: cpu sinkhorn_step (1 read, 1 exp per element)":
               lambda: cpu.sinkhorn_step(S, SCALE, g0, log_r),
           "cpu backend, col + row pass": lambda: cpu.row_lse(S, SCALE, cpu.col_lse(S, SCALE, f0)),
           "nk.sinkhorn(n_iters=1), cpu, incl. validation + opening row pass":
               lambda: nk.sinkhorn(S, SCALE, n_iters=1, tol=None, backend="cpu"),
           "torch backend, col + row pass":
               lambda: tb.row_lse(S, SCALE, tb.col_lse(S, SCALE, f0)),
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
    roofs = native_roofs(args.repeat)
    t = best_times(fns, args.repeat)
    exp_floor = 2 * S.numel() / roofs["exp"]
    read_floor = S.numel() * 4 / roofs["read"]
    ours = t["ours: cpu sinkhorn_step (1 read, 1 exp per element)"]
    print(f"\n1. one Sinkhorn iteration, {n} x {n} float32; roofs measured now by _C_cpu: "
          f"read {roofs['read'] / 1e9:.1f} GB/s, exp {roofs['exp'] / 1e9:.2f} G/s")
    for name, v in t.items():
        print(f"  {name:66s} {v * 1e3:8.2f} ms   {v / ours:6.2f}x ours")
    print(f"  {'exp floor (2 N M exponentials at the exp rate)':66s} {exp_floor * 1e3:8.2f} ms")
    print(f"  {'read floor (1 read of S)':66s} {read_floor * 1e3:8.2f} ms")
    pair = t["cpu backend, col + row pass"]
    print(f"  col + row pass: {pair / exp_floor:.2f}x the exp floor, "
          f"{pair / read_floor:.2f}x the read floor")
    if "torch.compile(eager loop)" in t:
        target("torch.compile / ours", t["torch.compile(eager loop)"] / ours, 3.0, at_most=False)
    target("eager / ours", t["eager two-logsumexp loop"] / ours, 20.0, at_most=False)
    target("ours / exp floor", ours / exp_floor, 1.3)
    print(f"  (ours / read floor: {ours / read_floor:.2f})")
    return t, exp_floor


def case_dtypes(args):
    n = 4096
    S32 = scores(n, n, seed=3)
    cpu = get("cpu", S32.device)
    g, f, log_r = torch.zeros(n), torch.randn(n) * 0.1, torch.zeros(n)
    lse_row, lse_col = cpu.row_lse(S32, SCALE, g), cpu.col_lse(S32, SCALE, f)
    y = torch.arange(n)
    coef = torch.full((n,), 0.5 / n)
    print(f"\n2. low-precision storage vs float32, {n} x {n} (time per element, ratio to float32)")
    for dtype in (torch.bfloat16, torch.float16):
        S = S32.to(dtype)
        out32, out = torch.empty_like(S32), torch.empty_like(S)
        fns = {}
        for name, T, o in (("float32", S32, out32), (str(dtype)[6:], S, out)):
            fns[("step", name)] = lambda T=T: cpu.sinkhorn_step(T, SCALE, g, log_r)
            fns[("row", name)] = lambda T=T: cpu.row_lse(T, SCALE, g)
            fns[("col", name)] = lambda T=T: cpu.col_lse(T, SCALE, f)
            fns[("grad", name)] = lambda T=T, o=o: cpu.ncl_grad_(
                T, SCALE, f, g, lse_row, lse_col, coef, coef, y, y, out=o)
        t = best_times(fns, args.repeat)
        worst = 0.0
        for prim in ("step", "row", "col", "grad"):
            ratio = t[(prim, str(dtype)[6:])] / t[(prim, "float32")]
            worst = max(worst, ratio)
            print(f"  {prim:5s} {str(dtype)[6:]:9s} {t[(prim, str(dtype)[6:])] * 1e3:7.2f} ms vs "
                  f"float32 {t[(prim, 'float32')] * 1e3:7.2f} ms -> {ratio:.2f}x")
        target(f"{str(dtype)[6:]} / float32 time, worst primitive", worst, 1.0)


def case_loss(args):
    n, iters = 4096, 4
    S0 = scores(n, n, seed=1)
    cpu = get("cpu", S0.device)
    g = torch.randn(n)
    f = torch.randn(n)
    log_r, log_c = torch.zeros(n), torch.zeros(n)
    y = torch.arange(n)
    coef = torch.full((n,), 0.5 / n)

    def loss_step():
        S = S0.clone()  # the caller gives S up with inplace_backward=True
        t0 = time.perf_counter()
        S.requires_grad_()
        nk.ncl_loss(S, SCALE, n_iters=iters, inplace_backward=True, backend="cpu").backward()
        loss_step.t = time.perf_counter() - t0

    def fused_sequence():
        # what the loss costs in kernels once the driver runs on sinkhorn_step
        S = S0.clone()
        t0 = time.perf_counter()
        gg = torch.zeros(n)
        for _ in range(iters):
            ff, _, lse_c = cpu.sinkhorn_step(S, SCALE, gg, log_r)
            gg = log_c - lse_c
        lse_r = cpu.row_lse(S, SCALE, gg)
        cpu.ncl_grad_(S, SCALE, ff, gg, lse_r, lse_c, coef, coef, y, y, out=S)
        fused_sequence.t = time.perf_counter() - t0

    def row_pass():
        cpu.row_lse(S0, SCALE, g)

    def col_pass():
        cpu.col_lse(S0, SCALE, f)

    best = {"loss": float("inf"), "fused": float("inf"), "row": float("inf"),
            "col": float("inf")}
    for _ in range(args.repeat):
        loss_step()
        best["loss"] = min(best["loss"], loss_step.t)  # excludes the clone
        fused_sequence()
        best["fused"] = min(best["fused"], fused_sequence.t)
        best["row"] = min(best["row"], best_times({"r": row_pass}, 1)["r"])
        best["col"] = min(best["col"], best_times({"c": col_pass}, 1)["c"])
    budget = 10 * best["row"]
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
    print(f"\n3. ncl_loss fwd + bwd, {n} x {n} float32, n_iters={iters}, inplace_backward=True")
    print(f"  ncl_loss {best['loss'] * 1e3:.1f} ms; on sinkhorn_step (kernel sequence) "
          f"{best['fused'] * 1e3:.1f} ms; our row pass {best['row'] * 1e3:.2f} ms, column pass "
          f"{best['col'] * 1e3:.2f} ms")
    target("ncl_loss / 10 row passes", best["loss"] / budget, 1.0)
    target("loss on sinkhorn_step / 10 row passes", best["fused"] / budget, 1.0)
    target("peak memory beyond S, % of S", 100 * peak / s_mib, 5.0)


def case_embeddings(args):
    n, d, iters = 8192, 128, 4
    gen = torch.Generator().manual_seed(2)
    X = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    Y = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    # materialize=False: the streaming form itself (at this size the default policy forms
    # S, which fits the default budget; "auto" times that choice)
    def stream():
        nk.sinkhorn_embeddings(X, Y, SCALE, n_iters=iters, tol=None, backend="cpu",
                               materialize=False)

    def auto():
        nk.sinkhorn_embeddings(X, Y, SCALE, n_iters=iters, tol=None, backend="cpu")

    def matmuls():
        for _ in range(2 * iters):
            X @ Y.T

    t = best_times({"stream": stream, "auto": auto, "8 matmul": matmuls},
                   max(2, args.repeat // 2))
    common = PEAK + f"""
    gen = torch.Generator().manual_seed(2)
    X = torch.nn.functional.normalize(torch.randn({n}, {d}, generator=gen), dim=1)
    Y = torch.nn.functional.normalize(torch.randn({n}, {d}, generator=gen), dim=1)
    nk.sinkhorn_embeddings(X[:512], Y[:512], {SCALE}, n_iters=1, tol=None, backend="cpu")
    nk.sinkhorn(X[:512] @ Y[:512].T, {SCALE}, n_iters=1, tol=None, backend="cpu")
    before = rss()
    """
    peak_stream = child_peak_mib(common + f"""
    nk.sinkhorn_embeddings(X, Y, {SCALE}, n_iters={iters}, tol=None, backend="cpu",
                           materialize=False)
    print(rss() - before)
    """)
    peak_dense = child_peak_mib(common + f"""
    nk.sinkhorn(X @ Y.T, {SCALE}, n_iters={iters}, tol=None, backend="cpu")
    print(rss() - before)
    """)
    print(f"\n4. sinkhorn_embeddings N = M = {n}, D = {d}, {iters} iterations")
    print(f"  streaming {t['stream'] * 1e3:.0f} ms; 8 x matmul ({n}x{d} @ {d}x{n}) "
          f"{t['8 matmul'] * 1e3:.0f} ms -> {t['stream'] / t['8 matmul']:.2f}x")
    print(f"  default policy (materialize=None: forms S when it fits the budget) "
          f"{t['auto'] * 1e3:.0f} ms")
    ratio = f"{peak_stream / peak_dense:.3f}" if peak_dense > 0 else "n/a"
    print(f"  peak memory growth: streaming {peak_stream:.0f} MiB, materialized "
          f"{peak_dense:.0f} MiB -> {ratio}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-pot", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cases", default="1,2,3", help="comma-separated; 4 (embeddings) is extra")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from ncl_kernels import _C_cpu
    info = _C_cpu.build_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; _C_cpu kernels "
          f"{info['isa']} (available {info['available_isas']}), OpenMP {info['openmp']}")
    cases = {"1": case_iteration, "2": case_dtypes, "3": case_loss, "4": case_embeddings}
    for c in args.cases.split(","):
        cases[c](args)


if __name__ == "__main__":
    main()
