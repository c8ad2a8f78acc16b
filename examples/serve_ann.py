"""Evaluate with a bank's gallery bias, then serve it from an approximate Faiss index.

A bank of training queries gives every gallery item its NCL bias
(``retrieval.gallery_bias``); ``retrieval.to_faiss`` folds that bias into one extra
dimension of an inner-product index, so any Faiss index (here IVF and HNSW) ranks by
``scale * <q, y_j> + bias_j``. The script compares exact retrieval without and with the
bias, then the recall@10 of each index against the exact biased top 10.

    python examples/serve_ann.py [--gallery 10000]    (needs faiss-cpu)
"""

import argparse

import torch

import ncl_kernels as nk

R = nk.retrieval


def hubby_data(n_gallery, n_queries, n_bank, d=32, seed=0):
    """Pairs that share a latent; every query also carries one shared direction ``h``, and
    the first 5% of the items lean on it, so they score high for every query (hubs)."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    h = unit(torch.randn(1, d, generator=gen), dim=1)

    def queries(count):
        z = torch.randn(count, d, generator=gen) * (4 / d ** 0.5)
        return z, unit(z + 0.5 * torch.randn(count, d, generator=gen) + h, dim=1)

    z, q = queries(n_gallery)
    gallery = z + 0.5 * torch.randn(n_gallery, d, generator=gen)
    gallery[: n_gallery // 20] += 2.0 * h
    pick = torch.randperm(n_gallery, generator=gen)[:n_queries]
    _, bank = queries(n_bank)                   # other queries of the same kind
    return unit(gallery, dim=1), q[pick], pick, bank


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=10000)
    p.add_argument("--queries", type=int, default=500)
    args = p.parse_args(argv)
    gallery, queries, targets, bank = hubby_data(args.gallery, args.queries, 2000)
    scale = 20.0
    bias = R.gallery_bias(bank, gallery, scale, method="ncl", n_iters=50, tol=1e-3)
    table = {"none": R.metrics(R.ranks(queries, gallery, targets, scale)),
             "ncl bias": R.metrics(R.ranks(queries, gallery, targets, scale, bias=bias))}
    print(f"exact retrieval, {args.queries} queries over {args.gallery} items")
    print(R.format_metrics(table))

    k = 10
    _, exact = R.topk(queries, gallery, k, scale, bias=bias)
    print(f"\nrecall@{k} of approximate indexes against the exact biased top {k}")
    recalls = {}
    for factory, params in (("IVF64,Flat", "nprobe=16"), ("HNSW32", "efSearch=64")):
        index = R.to_faiss(gallery, bias, scale, factory=factory, params=params)
        _, ids = index.search(R.augment_queries(queries, index.d), k)
        found = sum(len(set(a.tolist()) & set(b.tolist()))
                    for a, b in zip(torch.from_numpy(ids), exact))
        recalls[factory] = found / exact.numel()
        print(f"  {factory:12s} {params:12s} {recalls[factory]:.3f}")
    return table, recalls


if __name__ == "__main__":
    main()
