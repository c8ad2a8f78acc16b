"""Retrieval on CUDA tensors: skipped (by marker, not at import) without a GPU."""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref

from conftest import random_embeddings, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
R = nk.retrieval


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ranks_exact_ties_on_cuda(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (67, 5), generator=gen).to(dtype)
    y = torch.randint(-2, 3, (1031, 5), generator=gen).to(dtype)
    bias = torch.randint(-3, 4, (1031,), generator=gen).float()
    targets = torch.randint(0, 1031, (67, 2), generator=gen)
    expect = ref.ranks(ref.scores(q, y, 2.0, bias), targets)
    for chunk in (None, 97):
        ours = R.ranks(q.cuda(), y.cuda(), targets.cuda(), 2.0, bias=bias.cuda(), chunk=chunk)
        assert ours.device.type == "cuda" and torch.equal(ours.cpu(), expect)


def test_topk_and_bias_on_cuda():
    q, y = random_embeddings(67, 1031, 16, torch.float32, seed=1)
    bank, _ = random_embeddings(300, 1, 16, torch.float32, seed=2)
    for method in ("ncl", "qbnorm"):
        g = R.gallery_bias(bank.cuda(), y.cuda(), 20.0, method=method, n_iters=20, tol=None)
        g64 = ref.gallery_bias(bank, y, 20.0, method=method, n_iters=20, tol=None)
        assert rel_err(g.cpu(), g64) < 1e-5
    values, _ = R.topk(q.cuda(), y.cuda(), 10, 20.0, bias=g, chunk=100)
    expect = ref.scores(q, y, 20.0, g.cpu()).topk(10, dim=1).values
    assert rel_err(values.cpu(), expect) < 1e-6
