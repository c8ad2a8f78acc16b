"""Profile ``ncl_kernels.retrieval.ranks`` against the matrix product it must do.

Target (issue 7): 1,000 queries over a 1,000,000 x 64 float32 gallery; peak memory growth
under 2 GB (the dense score matrix alone would be 4 GB) and time within 1.5x of the
product. The baseline is the same chunked product into a reused buffer (the FLOPs ranks
cannot avoid). Runs alternate (product, one-pass ranks, ...) and the best of ``--reps`` is
reported, because this machine is shared and timings are noisy.

    python bench/profile_retrieval.py                       # the issue's sizes
    python bench/profile_retrieval.py --gallery 100000 --chunks 1024 4096 --two-pass
    python bench/profile_retrieval.py --threads 1 --bias
    python bench/profile_retrieval.py --device cuda --bank 100000       # + gallery_bias (GPU)

``--bank K`` also times ``gallery_bias(method="ncl")`` for a K-query bank against the
gallery (``--iters`` Sinkhorn iterations, no early stop), the issue's GPU target.
"""

from __future__ import annotations

import argparse
import time

import torch

import ncl_kernels as nk
from ncl_kernels.retrieval import _stream
from ncl_kernels.retrieval._scorers import LinearScorer


class Meter:
    """Wall time and peak memory growth of one call (RSS on CPU, allocator peak on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = rss_kib("VmRSS") * 1024
            reset_peak()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if self.cuda else rss_kib("VmHWM") * 1024
        return out, seconds, peak - before


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def product_only(scorer, chunk: int) -> None:
    buf = _stream._Buffers(scorer.n_queries, chunk, scorer.acc, scorer.Q.device)
    for start, stop in _stream._spans(scorer.n_items, chunk):
        scorer(slice(start, stop), out=buf.block(stop - start))


def unit_rows(n: int, dim: int, gen, device) -> torch.Tensor:
    out = torch.empty(n, dim, device=device)
    for start in range(0, n, 65536):   # no full-size temporaries
        block = torch.randn(min(65536, n - start), dim, generator=gen)
        out[start:start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", type=int, nargs="+", default=[None])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bias", action="store_true", help="add a per-item bias")
    p.add_argument("--two-pass", action="store_true", help="also time the two-pass method")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is far less sensitive to a loaded machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bank", type=int, default=0, help="also time gallery_bias(ncl)")
    p.add_argument("--iters", type=int, default=10, help="Sinkhorn iterations for --bank")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    meter = Meter(device)

    gen = torch.Generator().manual_seed(0)
    gallery = unit_rows(a.gallery, a.dim, gen, device)
    queries = unit_rows(a.queries, a.dim, gen, device)
    targets = torch.randint(0, a.gallery, (a.queries,), generator=gen).to(device)
    bias = (0.01 * torch.randn(a.gallery, generator=gen)).to(device) if a.bias else None
    scorer = LinearScorer(queries, gallery, 20.0, bias)
    T = targets[:, None]
    flops = 2.0 * a.queries * a.gallery * a.dim
    print(f"queries {a.queries}, gallery {a.gallery} x {a.dim} float32 on {device}, bias "
          f"{a.bias}, threads {torch.get_num_threads()}")

    for chunk in a.chunks:
        chunk = _stream.default_chunk(a.queries, a.gallery, chunk, device)
        runs = {"product": lambda c=chunk: product_only(scorer, c),
                "ranks (one pass)": lambda c=chunk: _stream.rank_one_pass(scorer, T, c)}
        if a.two_pass:
            runs["ranks (two pass)"] = lambda c=chunk: _stream.rank_two_pass(scorer, T, c)
        best = dict.fromkeys(runs, float("inf"))
        growth = dict.fromkeys(runs, 0)
        for _ in range(a.reps):
            for name, fn in runs.items():
                out, seconds, grew = meter(fn)
                best[name] = min(best[name], seconds)
                growth[name] = max(growth[name], grew)
                if name == "ranks (one pass)":
                    recounted = out[1]
        print(f"chunk {chunk} (block {a.queries * chunk * 4 / 2**20:.0f} MiB), "
              f"rows recounted by the two-pass fallback: {recounted}")
        base = best["product"]
        for name, t in best.items():
            print(f"  {name:18s} {t:7.3f} s  {t / base:5.2f}x product  "
                  f"{flops / t / 1e9:6.1f} GFLOP/s  peak memory growth "
                  f"{growth[name] / 2**30:.3f} GiB")

    if a.bank:
        bank = unit_rows(a.bank, a.dim, gen, device)
        # a first row pass, then a column and a row pass per iteration, each a K x M x D
        # product (the exp and the reductions are not counted)
        bias_flops = 2.0 * a.bank * a.gallery * a.dim * (2 * a.iters + 1)
        _, seconds, grew = meter(lambda: nk.retrieval.gallery_bias(
            bank, gallery, 20.0, method="ncl", n_iters=a.iters, tol=None))
        print(f"gallery_bias(ncl): bank {a.bank} x gallery {a.gallery}, {a.iters} iterations: "
              f"{seconds:.3f} s ({seconds / (a.iters + 0.5):.3f} s per iteration), matmul "
              f"throughput {bias_flops / seconds / 1e12:.2f} TFLOP/s, peak memory growth "
              f"{grew / 2**30:.3f} GiB")


if __name__ == "__main__":
    main()
