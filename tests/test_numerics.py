"""Numerics at the edges: extreme scales, masks, infeasible and degenerate problems,
non-convergence, determinism."""

import math
import warnings

import pytest
import torch

import ncl_kernels as nk

from conftest import random_embeddings

LOW_AND_SINGLE = [torch.float32, torch.bfloat16, torch.float16]
SCALES = [0.1, 1.0, 10.0, 100.0, 1000.0]


def finite(t):
    return bool(torch.isfinite(t).all())


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")  # float(loss)
@pytest.mark.parametrize("dtype", LOW_AND_SINGLE)
@pytest.mark.parametrize("scale", SCALES)
def test_cosine_scores_give_finite_results_at_every_scale(backend, dtype, scale):
    x, y = random_embeddings(37, 29, 16, dtype, seed=int(scale * 10))
    S = (x.float() @ y.float().T).to(dtype)

    res = nk.sinkhorn(S, scale, n_iters=30, tol=None, backend=backend)
    assert finite(res.f) and finite(res.g), (res.f, res.g)

    s = torch.tensor(float(scale), requires_grad=True)
    Sg = S.clone().requires_grad_()
    loss = nk.ncl_loss(Sg, s, backend=backend)
    loss.backward()
    assert math.isfinite(float(loss))
    assert finite(Sg.grad) and finite(s.grad)

    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    s2 = torch.tensor(float(scale), requires_grad=True)
    loss = nk.ncl_loss_embeddings(xg, yg, s2, backend=backend)
    loss.backward()
    assert math.isfinite(float(loss))
    assert finite(xg.grad) and finite(yg.grad) and finite(s2.grad)


def masked(n, m, *, row=None, col=None, dtype=torch.float32):
    S = torch.randn(n, m, generator=torch.Generator().manual_seed(7)).to(dtype) * 0.3
    if row is not None:
        S[row] = -math.inf
    if col is not None:
        S[:, col] = -math.inf
    return S


def test_a_fully_masked_row_with_mass_raises_naming_it(backend):
    S = masked(6, 5, row=3)
    with pytest.raises(ValueError, match=r"row 3 has positive mass"):
        nk.sinkhorn(S, 2.0, backend=backend)
    with pytest.raises(ValueError, match=r"row 3 has positive mass"):
        nk.ncl_loss(S, 2.0, row_targets=torch.tensor([0, 1, 2, -1, 4, 0]),
                    col_targets=torch.tensor([0, 1, 2, -1, 4]), backend=backend)


def test_a_fully_masked_column_with_mass_raises_naming_it(backend):
    S = masked(6, 5, col=2)
    with pytest.raises(ValueError, match=r"column 2 has positive mass"):
        nk.sinkhorn(S, 2.0, backend=backend)


def test_a_fully_masked_row_without_mass_is_solved(backend):
    S = masked(6, 5, row=3)
    r = torch.ones(6)
    r[3] = 0
    res = nk.sinkhorn(S, 2.0, row_mass=r, n_iters=500, tol=1e-6, backend=backend)
    assert res.f[3] == -math.inf
    keep = torch.arange(6) != 3
    assert finite(res.f[keep]) and finite(res.g)
    assert float(res.error) <= 1e-6
    P = torch.exp(2.0 * S.double() + res.f.double()[:, None] + res.g.double()[None, :])
    assert torch.allclose(P.sum(1), r.double(), atol=1e-5)


def test_a_fully_masked_column_without_mass_is_solved(backend):
    S = masked(6, 5, col=1)
    c = torch.full((5,), 6 / 4)
    c[1] = 0
    res = nk.sinkhorn(S, 2.0, col_mass=c, n_iters=500, tol=1e-6, backend=backend)
    assert res.g[1] == -math.inf
    keep = torch.arange(5) != 1
    assert finite(res.g[keep]) and finite(res.f)


def test_masked_entries_receive_no_mass_and_no_gradient(backend):
    S = torch.randn(5, 5, generator=torch.Generator().manual_seed(2)) * 0.3
    S[0, 3] = S[4, 1] = -math.inf
    res = nk.sinkhorn(S, 3.0, n_iters=50, tol=None, backend=backend)
    assert finite(res.f) and finite(res.g)
    Sg = S.clone().requires_grad_()
    nk.ncl_loss(Sg, 3.0, backend=backend).backward()
    assert Sg.grad[0, 3] == 0 and Sg.grad[4, 1] == 0
    assert finite(Sg.grad)


def test_not_converging_warns_and_reports_the_error(backend):
    S = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    with pytest.warns(nk.SinkhornConvergenceWarning, match="n_iters"):
        res = nk.sinkhorn(S, 20.0, n_iters=2, tol=1e-9, check_every=1, backend=backend)
    assert res.n_iters == 2
    assert float(res.error) > 1e-9


def test_converging_does_not_warn(backend):
    S = torch.randn(40, 30, generator=torch.Generator().manual_seed(0)) * 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", nk.SinkhornConvergenceWarning)
        res = nk.sinkhorn(S, 1.0, n_iters=500, tol=1e-5, backend=backend)
    assert float(res.error) <= 1e-5 and res.n_iters < 500


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_results_are_bitwise_repeatable(backend, dtype):
    x, y = random_embeddings(67, 45, 12, dtype, seed=5)
    S = (x.double() @ y.double().T).to(dtype)
    first = nk.sinkhorn(S, 7.0, n_iters=9, tol=None, backend=backend)
    again = nk.sinkhorn(S, 7.0, n_iters=9, tol=None, backend=backend)
    assert torch.equal(first.f, again.f) and torch.equal(first.g, again.g)
    grads = []
    for _ in range(2):
        Sg = S.clone().requires_grad_()
        nk.ncl_loss(Sg, 7.0, backend=backend).backward()
        grads.append(Sg.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_target_on_a_masked_score_is_refused(backend):
    S = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.3
    S[2, 2] = -math.inf
    work = S.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"row_targets: row 2's target column 2 has a masked"):
        nk.ncl_loss(work, 2.0, inplace_backward=True, backend=backend)
    assert torch.equal(work.detach(), S)
    z = torch.tensor([0, 1, 3, -1])  # column 2's target row 3 is fine; row 2 has no target
    y = torch.tensor([0, 1, -1, 3])
    loss = nk.ncl_loss(S, 2.0, row_targets=y, col_targets=z, backend=backend)
    assert math.isfinite(float(loss))
    with pytest.raises(ValueError, match=r"col_targets: column 2's target row 2"):
        nk.ncl_loss(S, 2.0, row_targets=y, backend=backend)
