"""Profile ``ncl_kernels.retrieval.ranks`` against the matrix product it must do.

Target (issue 7): 1,000 queries over a 1,000,000 x 64 float32 gallery; peak memory growth
under 2 GB (the dense score matrix alone would be 4 GB) and time within 1.5x of the
product. The baseline is the same chunked product into a reused buffer (the FLOPs ranks
cannot avoid). Runs alternate (product, one-pass ranks, ...) and the best of ``--reps`` is
reported, because this machine is shared and timings are noisy.

    python bench/profile_retrieval.py                       # the issue's sizes
    python bench/profile_retrieval.py --gallery 100000 --chunks 1024 4096 --two-pass
    python bench/profile_retrieval.py --threads 1 --bias
"""

from __future__ import annotations

import argparse
import time

import torch

from ncl_kernels.retrieval import _stream
from ncl_kernels.retrieval._scorers import LinearScorer


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", type=int, nargs="+", default=[None])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bias", action="store_true", help="add a per-item bias (addmm)")
    p.add_argument("--two-pass", action="store_true", help="also time the two-pass method")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is far less sensitive to a loaded machine)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    gen = torch.Generator().manual_seed(0)
    gallery = torch.empty(a.gallery, a.dim)
    for start in range(0, a.gallery, 65536):   # no full-size temporaries
        block = torch.randn(min(65536, a.gallery - start), a.dim, generator=gen)
        gallery[start:start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    queries = torch.nn.functional.normalize(torch.randn(a.queries, a.dim, generator=gen), dim=1)
    targets = torch.randint(0, a.gallery, (a.queries,), generator=gen)
    bias = 0.01 * torch.randn(a.gallery, generator=gen) if a.bias else None
    scorer = LinearScorer(queries, gallery, 20.0, bias)
    T = targets[:, None]
    flops = 2.0 * a.queries * a.gallery * a.dim
    print(f"queries {a.queries}, gallery {a.gallery} x {a.dim} float32, bias {a.bias}, "
          f"threads {torch.get_num_threads()}")

    for chunk in a.chunks:
        chunk = _stream.default_chunk(a.queries, a.gallery, chunk)
        runs = {"product": lambda c=chunk: product_only(scorer, c),
                "ranks (one pass)": lambda c=chunk: _stream.rank_one_pass(scorer, T, c)}
        if a.two_pass:
            runs["ranks (two pass)"] = lambda c=chunk: _stream.rank_two_pass(scorer, T, c)
        best = dict.fromkeys(runs, float("inf"))
        growth = {}
        for _ in range(a.reps):
            for name, fn in runs.items():
                before = rss_kib("VmRSS")
                reset_peak()
                t0 = time.perf_counter()
                out = fn()
                best[name] = min(best[name], time.perf_counter() - t0)
                growth[name] = max(growth.get(name, 0), rss_kib("VmHWM") - before)
                if name == "ranks (one pass)":
                    recounted = out[1]
        print(f"chunk {chunk} (block {a.queries * chunk * 4 / 2**20:.0f} MiB), "
              f"rows recounted by the two-pass fallback: {recounted}")
        base = best["product"]
        for name, t in best.items():
            print(f"  {name:18s} {t:7.3f} s  {t / base:5.2f}x product  "
                  f"{flops / t / 1e9:6.1f} GFLOP/s  peak RSS growth "
                  f"{growth[name] / 2**20:.3f} GiB")


if __name__ == "__main__":
    main()
