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
