"""The same checks on CUDA tensors: skipped (by marker, not at import) without a GPU."""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from conftest import STORAGE_DTYPES, assert_close, random_embeddings, random_scores, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_backends():
    names = ["torch"]
    if nk.backends()["cuda"]["usable"]:
        names.append("cuda")
    return names


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (67, 45), (1031, 4099)])
def test_sinkhorn_on_cuda(backend, dtype, shape):
    S = random_scores(*shape, dtype, seed=shape[1], strided=True)
    out = nk.sinkhorn(S.cuda(), 10.0, n_iters=10, tol=None, backend=backend)
    r64 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None)
    r32 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None, dtype=torch.float32)
    assert_close(out.f.cpu(), r64.f, r32.f, dtype, "f")
    assert_close(out.g.cpu(), r64.g, r32.g, dtype, "g")


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_loss_on_cuda(backend, dtype):
    S0 = random_scores(131, 77, dtype, seed=3)
    S = S0.cuda().requires_grad_()
    loss = nk.ncl_loss(S, 12.0, backend=backend)
    loss.backward()
    refs = []
    for ref_dtype in (torch.float64, torch.float32):
        leaf = S0.to(torch.float64 if ref_dtype == torch.float64 else dtype).requires_grad_()
        value = ref.ncl_loss(leaf, 12.0, dtype=ref_dtype)
        value.backward()
        refs.append((value.detach(), leaf.grad))
    (l64, g64), (l32, g32) = refs
    assert_close(loss.detach().cpu(), l64, l32, dtype, "loss")
    assert_close(S.grad.cpu(), g64, g32, dtype, "dS")


def test_embeddings_and_retrieval_on_cuda():
    x, y = random_embeddings(300, 200, 64, torch.float32, seed=4)
    loss = nk.ncl_loss_embeddings(x.cuda(), y.cuda(), 20.0)
    assert rel_err(loss.cpu(), ref.ncl_loss_embeddings(x, y, 20.0)) < 1e-5
    bias = nk.retrieval.gallery_bias(x.cuda(), y.cuda(), 20.0, n_iters=20, tol=None)
    assert rel_err(bias.cpu(), ref.gallery_bias(x, y, 20.0, n_iters=20, tol=None)) < 1e-5
    targets = torch.arange(200)
    ranks = nk.retrieval.ranks(y.cuda(), x.cuda(), targets.cuda(), 20.0)
    assert torch.equal(ranks.cpu(), ref.ranks(ref.scores(y, x, 20.0), targets))
