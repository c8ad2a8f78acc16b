"""ncl_kernels.retrieval against the oracle: biases, streaming ranks and top-k, metrics."""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from conftest import random_embeddings, rel_err

R = nk.retrieval


@pytest.mark.parametrize("method", ["ncl", "qbnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gallery_bias_matches_oracle(method, dtype, small_chunks):
    bank, gallery = random_embeddings(53, 29, 12, dtype, seed=1)
    ours = R.gallery_bias(bank, gallery, 20.0, method=method, n_iters=30, tol=None)
    r64 = ref.gallery_bias(bank, gallery, 20.0, method=method, n_iters=30, tol=None)
    assert rel_err(ours, r64) < (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("chunk", [None, 1, 4, 7, 100])
def test_ranks_and_topk_stream_like_dense(chunk):
    q, gallery = random_embeddings(37, 23, 8, torch.float64, seed=2)
    bias = torch.randn(23, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 23, (37,), generator=torch.Generator().manual_seed(1))
    ours = R.ranks(q, gallery, targets, 5.0, bias=bias, chunk=chunk)
    dense = ref.scores(q, gallery, 5.0, bias)
    assert torch.equal(ours, ref.ranks(dense, targets))
    values, indices = R.topk(q, gallery, 6, 5.0, bias=bias, chunk=chunk)
    expect_v, expect_i = dense.topk(6, dim=1)
    torch.testing.assert_close(values, expect_v)
    assert torch.equal(indices, expect_i)


def test_ranks_exact_ties_count_against_the_query():
    # integer-valued embeddings: every score is exact in float32
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    targets = torch.tensor([1, 2, 0])
    for chunk in (1, 2, 3, None):
        ours = R.ranks(q, gallery, targets, chunk=chunk)
        assert ours.tolist() == [2, 2, 4]
        assert torch.equal(ours, ref.ranks(ref.scores(q, gallery), targets))


def test_ranks_several_positives_take_the_best():
    q, gallery = random_embeddings(15, 40, 6, torch.float32, seed=3)
    targets = torch.randint(0, 40, (15, 3), generator=torch.Generator().manual_seed(2))
    targets[::2, 2] = -1
    for chunk in (None, 9):
        ours = R.ranks(q, gallery, targets, 3.0, chunk=chunk)
        assert torch.equal(ours, ref.ranks(ref.scores(q, gallery, 3.0), targets))


def test_metrics_match_oracle_and_hand_numbers():
    ranks = torch.tensor([1, 2, 5, 11, 60, 1])
    m = R.metrics(ranks)
    assert m == ref.metrics(ranks)
    assert m["R@1"] == pytest.approx(100 * 2 / 6) and m["R@5"] == pytest.approx(100 * 4 / 6)
    assert m["MdR"] == 3.5 and m["MnR"] == pytest.approx(80 / 6)
    table = R.format_metrics({"none": m})
    assert "R@1" in table and "none" in table


def test_retrieval_bad_inputs():
    q, gallery = random_embeddings(4, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="method"):
        R.gallery_bias(q, gallery, method="nope")
    with pytest.raises(TypeError, match="int64"):
        R.ranks(q, gallery, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        R.ranks(q, gallery, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="at least one target"):
        R.ranks(q, gallery, torch.tensor([[0, 1], [-1, -1], [2, -1], [3, 4]]))
    with pytest.raises(ValueError, match="k must be"):
        R.topk(q, gallery, 6)
    with pytest.raises(ValueError, match="chunk"):
        R.topk(q, gallery, 2, chunk=0)
    with pytest.raises(ValueError, match="ranks start at 1"):
        R.metrics(torch.tensor([0, 1]))
