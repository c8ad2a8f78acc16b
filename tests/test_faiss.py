"""Faiss export: searching the augmented index returns what retrieval.topk returns."""

import pytest
import torch

import ncl_kernels as nk

from conftest import random_embeddings

faiss = pytest.importorskip("faiss")
R = nk.retrieval


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_faiss_search_equals_topk(with_bias, dtype):
    q, gallery = random_embeddings(67, 1031, 16, dtype, seed=8)
    bias = (torch.randn(1031, generator=torch.Generator().manual_seed(8)) * 2.0
            if with_bias else None)
    scale, k = 20.0, 10
    values, indices = R.topk(q, gallery, k, scale, bias=bias, chunk=100)
    index = R.to_faiss(gallery, bias=bias, scale=scale)
    assert index.ntotal == 1031 and index.d == 17
    dist, ids = index.search(R.augment_queries(q), k)
    dist, ids = torch.from_numpy(dist), torch.from_numpy(ids)
    torch.testing.assert_close(dist.double(), values.double(), rtol=1e-5, atol=1e-4)
    # Faiss sums in its own order: items may only swap where their scores are within
    # rounding of each other; everywhere else the lists are identical
    gaps = (values[:, :-1] - values[:, 1:]).double()
    separated = (gaps > 1e-3).all(1)
    assert separated.sum() > 40
    assert torch.equal(ids[separated], indices[separated])


def test_faiss_bad_inputs():
    q, gallery = random_embeddings(3, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="finite"):
        R.to_faiss(gallery, bias=torch.tensor([0.0, float("-inf"), 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="length 5"):
        R.to_faiss(gallery, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="scale"):
        R.to_faiss(gallery, scale=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        R.augment_queries(q[0])


def _overlap(ids, ref):
    """Mean fraction of ``ref``'s items (per query) that ``ids`` found."""
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref)) / ref.numel()


def _clustered(m, q, d, seed):
    """A gallery of clustered unit vectors and queries near some of its items."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    centers = unit(torch.randn(max(2, m // 200), d, generator=gen), dim=1)
    pick = torch.randint(0, centers.shape[0], (m,), generator=gen)
    gallery = unit(centers[pick] + 0.3 * torch.randn(m, d, generator=gen), dim=1)
    queries = unit(gallery[torch.randint(0, m, (q,), generator=gen)]
                   + 0.3 * torch.randn(q, d, generator=gen), dim=1)
    return queries, gallery, torch.randn(m, generator=gen)


@pytest.mark.parametrize("factory,params,dim", [
    ("IVF16,Flat", "nprobe=16", None),       # every list probed: exhaustive
    ("HNSW16", "efSearch=512", None),
    ("IVF8,SQ8", "nprobe=8", None),
    ("PQ6x4", None, 24),                      # 6 sub-quantizers need a dimension they divide
])
def test_factories_rank_by_the_biased_score(factory, params, dim):
    q, gallery, bias = _clustered(2000, 50, 16, seed=1)
    scale, k = 20.0, 10
    _, ref = R.topk(q, gallery, k, scale, bias=bias)
    index = R.to_faiss(gallery, bias, scale, factory=factory, params=params, dim=dim)
    assert index.d == (dim or 17) and index.ntotal == 2000 and index.is_trained
    _, ids = index.search(R.augment_queries(q, index.d), k)
    found = _overlap(torch.from_numpy(ids), ref)
    print(f"{factory}: {found:.3f} of topk's items")
    # exhaustive IVF is exact; the graph and the scalar codes nearly; PQ codes round the
    # vectors (the bias coordinate too) and keep most of the neighbours
    assert found >= {"IVF16,Flat": 0.99, "HNSW16": 0.97, "IVF8,SQ8": 0.9, "PQ6x4": 0.2}[factory]
    # without the bias the same index finds a different list: the bias is in the metric
    _, plain = R.topk(q, gallery, k, scale)
    assert _overlap(plain, ref) < 0.9


def test_factory_refusals():
    _, gallery, _ = _clustered(300, 1, 8, seed=2)
    with pytest.raises(ValueError, match="dim"):
        R.to_faiss(gallery, factory="PQ4")             # 4 does not divide 9
    with pytest.raises(ValueError, match="at least"):
        R.to_faiss(gallery, dim=5)
    with pytest.raises(TypeError, match="factory"):
        R.to_faiss(gallery, factory=None)
    index = R.to_faiss(gallery, factory="IVF4,Flat", train_size=100)
    assert index.is_trained and index.ntotal == 300


@pytest.mark.slow
def test_ann_recall_on_a_large_gallery():
    """IVF and HNSW over 100k biased items: recall@10 against topk with the bias."""
    q, gallery, bias = _clustered(100_000, 100, 16, seed=0)
    scale, k = 20.0, 10
    _, ref = R.topk(q, gallery, k, scale, bias=bias)
    for factory, params, floor in (("IVF256,Flat", "nprobe=32", 0.9),
                                   ("HNSW32", "efSearch=128", 0.95)):
        index = R.to_faiss(gallery, bias, scale, factory=factory, params=params)
        _, ids = index.search(R.augment_queries(q), k)
        recall = _overlap(torch.from_numpy(ids), ref)
        print(f"{factory} {params}: recall@10 {recall:.3f}")
        assert recall >= floor, (factory, recall)
