"""Forming S = X @ Y.T once or streaming it: the cost model, the override, the budget, and
both forms against the oracle."""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from ncl_kernels import _materialize as M

from conftest import STORAGE_DTYPES, assert_close, random_embeddings


def test_the_override_decides():
    for materialize in (True, False):
        assert M.decide(materialize, 10, 10, 4, torch.float32, "cpu", passes=9,
                        backward=True) is materialize
    # True ignores the budget; None respects it
    assert M.decide(True, 1 << 20, 1 << 20, 4, torch.float32, "cpu", passes=9, backward=True,
                    budget=1)
    assert not M.decide(None, 64, 64, 128, torch.float32, "cpu", passes=9, backward=True,
                        budget=64 * 64 * 4 - 1)


def test_the_model_follows_the_costs(real_materialize_policy):
    # on an H200 (the G1 constants) bf16 embeddings stream at small D and form S at large D
    low = dict(dtype=torch.bfloat16, device_type="cuda", passes=9, backward=True)
    assert not M.decide(None, 4096, 4096, 64, **low)
    assert M.decide(None, 4096, 4096, 512, **low)
    stream, formed = M.estimate(4096, 4096, 256, torch.bfloat16, "cuda", 9, True)
    assert stream > 0 and formed > 0
    # a device without measured costs streams
    assert not M.decide(None, 64, 64, 512, torch.float32, "mps", passes=9, backward=True)


def test_bad_arguments_are_refused():
    x, y = random_embeddings(5, 4, 3, torch.float32)
    with pytest.raises(TypeError, match="materialize"):
        nk.ncl_loss_embeddings(x, y, materialize="yes")
    with pytest.raises(ValueError, match="memory_budget"):
        nk.sinkhorn_embeddings(x, y, memory_budget=-1)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_both_forms_match_the_oracle(backend, dtype):
    x0, y0 = random_embeddings(37, 29, 16, dtype, seed=3)
    r64 = ref.ncl_loss_embeddings(x0.double(), y0.double(), 12.0)
    for materialize in (False, True):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        loss = nk.ncl_loss_embeddings(x, y, 12.0, materialize=materialize, backend=backend)
        loss.backward()
        tol = 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
        assert abs(float(loss.detach()) - float(r64)) <= tol * abs(float(r64)), materialize
        assert x.grad.dtype == dtype and y.grad.dtype == dtype
        sol = nk.sinkhorn_embeddings(x0, y0, 12.0, n_iters=20, tol=None,
                                     materialize=materialize, backend=backend)
        want64 = ref.sinkhorn_embeddings(x0, y0, 12.0, n_iters=20, tol=None)
        want32 = ref.sinkhorn_embeddings(x0, y0, 12.0, n_iters=20, tol=None,
                                         dtype=torch.float32)
        assert_close(sol.g, want64.g, want32.g, dtype, f"g, materialize={materialize}")


def test_gradients_agree_between_the_forms(backend):
    x0, y0 = random_embeddings(23, 31, 8, torch.float64, seed=4)
    grads = []
    for materialize in (False, True):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
        nk.ncl_loss_embeddings(x, y, s, materialize=materialize, backend=backend).backward()
        grads.append((x.grad, y.grad, s.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gallery_bias_forms(real_materialize_policy):
    bank, gallery = random_embeddings(40, 25, 8, torch.float32, seed=5)
    a = nk.retrieval.gallery_bias(bank, gallery, 20.0, n_iters=30, tol=None, materialize=True)
    b = nk.retrieval.gallery_bias(bank, gallery, 20.0, n_iters=30, tol=None,
                                  materialize=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_errors_name_the_embeddings_in_both_forms():
    x, y = random_embeddings(6, 5, 4, torch.float32)
    x[2, 1] = float("nan")
    for materialize in (False, True):
        with pytest.raises(ValueError, match="x contains NaN"):
            nk.ncl_loss_embeddings(x, y, materialize=materialize)
        with pytest.raises(ValueError, match="bank contains NaN"):
            nk.retrieval.gallery_bias(x, y, materialize=materialize)
    big = torch.full((3, 2), 1e20)
    with pytest.raises(ValueError, match="x @ y.T overflows"):
        nk.sinkhorn_embeddings(big, big, materialize=True)


def test_the_default_policy_forms_small_problems_on_the_cpu(real_materialize_policy,
                                                            monkeypatch):
    calls = []
    real = M.checked_product
    monkeypatch.setattr(M, "checked_product", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = random_embeddings(64, 64, 32, torch.float32, seed=6)
    nk.ncl_loss_embeddings(x, y, 10.0)
    assert calls, "the cost model should form a 64 x 64 matrix on the CPU"
    calls.clear()
    nk.ncl_loss_embeddings(x, y, 10.0, memory_budget=1024)  # 16 KiB do not fit 1 KiB
    assert not calls
