"""Tests of the float64 oracle `python_ref` against facts that do not come from its code:
hand computations, closed forms, POT, CLIP's loss, autograd and gradcheck."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import python_ref as ref

try:
    import ot
except ImportError:  # only the POT comparison needs it
    ot = None

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def rand_mass(n, seed, total=None):
    x = torch.rand(n, generator=gen(seed), dtype=F64) + 0.1
    if total is not None:
        x = x * (total / x.sum())
    return x


def plan(scores, scale, f, g):
    return torch.exp(scale * scores.to(F64) + f[:, None] + g[None, :])


def cosine(n, d, seed):
    x = randn(n, d, seed=seed)
    return x / x.norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------- masses


def test_masses_defaults():
    r, c = ref.masses(4, 6)
    assert r.dtype == F64 and c.dtype == F64
    torch.testing.assert_close(r, torch.ones(4, dtype=F64))
    torch.testing.assert_close(c, torch.full((6,), 4 / 6, dtype=F64))


def test_masses_only_one_given():
    r, c = ref.masses(3, 5, row_mass=torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(r, torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    torch.testing.assert_close(c, torch.full((5,), 6 / 5, dtype=F64))
    r, c = ref.masses(4, 2, col_mass=torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(r, torch.full((4,), 2.0, dtype=F64))
    torch.testing.assert_close(c, torch.tensor([2.0, 6.0], dtype=F64))


def test_masses_both_given_and_mismatch():
    r, c = ref.masses(2, 3, row_mass=[1.0, 2.0], col_mass=[1.0, 1.0, 1.0 + 1e-6])
    assert r.sum() == 3.0 and c.shape == (3,)
    with pytest.raises(ValueError, match="agree"):
        ref.masses(2, 3, row_mass=[1.0, 2.0], col_mass=[1.0, 1.0, 1.1])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(row_mass=[1.0, -1.0, 1.0]),
        dict(row_mass=[1.0, math.nan, 1.0]),
        dict(row_mass=[1.0, 1.0]),
        dict(row_mass=[0.0, 0.0, 0.0]),
    ],
)
def test_masses_bad(kwargs):
    with pytest.raises(ValueError):
        ref.masses(3, 2, **kwargs)


def test_masses_dtype():
    r, c = ref.masses(3, 2, dtype=torch.float32)
    assert r.dtype == torch.float32 and c.dtype == torch.float32


# --------------------------------------------------------------------------- LSE primitives


def test_row_col_lse_by_hand_and_masks():
    S = torch.tensor([[0.0, 1.0, -math.inf], [-math.inf, -math.inf, -math.inf]], dtype=F64)
    g = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    lse = ref.row_lse(S, 2.0, g)
    assert math.isclose(lse[0].item(), math.log(math.exp(0.5) + math.exp(2.0 - 1.0)), rel_tol=1e-14)
    assert lse[1].item() == -math.inf
    f = torch.tensor([1.0, 3.0], dtype=F64)
    col = ref.col_lse(S, 2.0, f)
    assert math.isclose(col[0].item(), 1.0, rel_tol=1e-14)
    assert math.isclose(col[1].item(), 3.0, rel_tol=1e-14)
    assert col[2].item() == -math.inf
    torch.testing.assert_close(ref.row_lse(S.T, 2.0, f), col)


# --------------------------------------------------------------------------- Sinkhorn


def test_one_by_one_closed_form():
    a, s = 0.7, 3.0
    S = torch.tensor([[a]], dtype=F64)
    # init g = 0: f = log r - L = -s*a; g = log c - (L + f) = 0; error 0.
    res = ref.sinkhorn(S, s, n_iters=1, tol=None)
    assert res.n_iters == 1
    assert math.isclose(res.f.item(), -s * a, rel_tol=1e-15)
    assert res.g.item() == 0.0
    assert res.error == 0.0
    # masses 2 and 2: f = log 2 - s*a; g = log 2 - (s*a + log 2 - s*a) = 0.
    res = ref.sinkhorn(S, s, row_mass=[2.0], col_mass=[2.0], n_iters=1, tol=None)
    assert math.isclose(res.f.item(), math.log(2.0) - s * a, rel_tol=1e-14)
    assert abs(res.g.item()) < 1e-15
    assert res.error < 1e-15
    # f + g = log r - L after any number of iterations; fixed point detected at first check.
    res = ref.sinkhorn(S, s, row_mass=[2.0], col_mass=[2.0], n_iters=100, tol=1e-12, check_every=1)
    assert res.n_iters == 1
    assert math.isclose(res.f.item() + res.g.item(), math.log(2.0) - s * a, rel_tol=1e-14)


def test_first_iteration_by_hand_with_warm_start():
    S = torch.tensor([[0.2, -0.4, 1.0], [0.5, 0.0, -0.3]], dtype=F64)
    s = 2.0
    g0 = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
    r = [1.0, 2.0]
    c = [0.5, 1.5, 1.0]
    res = ref.sinkhorn(S, s, row_mass=r, col_mass=c, n_iters=1, tol=None, init_g=g0)
    f = [math.log(r[i]) - math.log(sum(math.exp(s * S[i, j].item() + g0[j].item()) for j in range(3))) for i in range(2)]
    g = [math.log(c[j]) - math.log(sum(math.exp(s * S[i, j].item() + f[i]) for i in range(2))) for j in range(3)]
    np.testing.assert_allclose(res.f.numpy(), f, rtol=1e-14)
    np.testing.assert_allclose(res.g.numpy(), g, rtol=1e-14)
    row = [sum(math.exp(s * S[i, j].item() + f[i] + g[j]) for j in range(3)) for i in range(2)]
    err = sum(abs(row[i] - r[i]) for i in range(2)) / 3.0
    assert math.isclose(res.error, err, rel_tol=1e-10)


def test_near_permutation():
    n = 7
    perm = torch.randperm(n, generator=gen(3))
    Pm = torch.zeros(n, n, dtype=F64)
    Pm[torch.arange(n), perm] = 1.0
    S = Pm + 0.01 * randn(n, n, seed=4)
    s = 50.0
    res = ref.sinkhorn(S, s, n_iters=200, tol=1e-12)
    P = plan(S, s, res.f, res.g)
    torch.testing.assert_close(P, Pm, atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape,seed", [((13, 9), 0), ((9, 13), 1), ((40, 23), 2)])
def test_marginals_after_convergence(shape, seed):
    n, m = shape
    S = randn(n, m, seed=seed)
    r = rand_mass(n, seed + 10)
    c = rand_mass(m, seed + 20, total=float(r.sum()))
    s = 3.0
    res = ref.sinkhorn(S, s, row_mass=r, col_mass=c, n_iters=20000, tol=1e-13, check_every=1)
    assert res.error <= 1e-13 and res.n_iters < 20000
    P = plan(S, s, res.f, res.g)
    torch.testing.assert_close(P.sum(1), r, atol=1e-10, rtol=0)
    torch.testing.assert_close(P.sum(0), c, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape,seed,scale", [((7, 5), 0, 2.0), ((40, 23), 1, 5.0), ((5, 11), 2, 1.0)])
def test_agrees_with_pot(shape, seed, scale):
    if ot is None:
        pytest.skip("POT (import ot) is not installed")
    n, m = shape
    S = randn(n, m, seed=seed)
    r = rand_mass(n, seed + 10, total=1.0)
    c = rand_mass(m, seed + 20, total=1.0)
    res = ref.sinkhorn(S, scale, row_mass=r, col_mass=c, n_iters=20000, tol=1e-14, check_every=1)
    ours = plan(S, scale, res.f, res.g).numpy()
    # POT's plan is exp((u + v - M) / reg)-shaped: with M = -S and reg = 1/scale, K = exp(scale * S).
    pot = ot.sinkhorn(
        r.numpy(), c.numpy(), -S.numpy(), 1.0 / scale, method="sinkhorn_log", numItermax=20000, stopThr=1e-15
    )
    np.testing.assert_allclose(ours, pot, atol=1e-8, rtol=0)
    np.testing.assert_allclose(ours, pot, rtol=1e-6)


def test_potentials_unshifted_and_shift_equivalence():
    S = randn(6, 4, seed=5)
    res = ref.sinkhorn(S, 2.0, n_iters=500, tol=1e-13, check_every=1)
    k = 3.5
    # (f + k, g - k) is the same plan; a warm start at g - k converges to (f + k, g - k) at once.
    warm = ref.sinkhorn(S, 2.0, n_iters=1, tol=None, init_g=res.g - k)
    torch.testing.assert_close(warm.f, res.f + k, atol=1e-12, rtol=0)
    torch.testing.assert_close(warm.g, res.g - k, atol=1e-12, rtol=0)
    torch.testing.assert_close(plan(S, 2.0, warm.f, warm.g), plan(S, 2.0, res.f, res.g), atol=1e-12, rtol=0)


def test_zero_mass_rows_and_columns():
    n, m = 8, 6
    S = randn(n, m, seed=6)
    r = rand_mass(n, 7)
    r[[1, 4]] = 0.0
    c = rand_mass(m, 8, total=float(r.sum()))
    c[2] = 0.0
    c = c * (r.sum() / c.sum())
    s = 2.0
    res = ref.sinkhorn(S, s, row_mass=r, col_mass=c, n_iters=5000, tol=1e-13, check_every=1)
    assert not torch.isnan(res.f).any() and not torch.isnan(res.g).any()
    assert torch.isneginf(res.f[[1, 4]]).all() and torch.isfinite(res.f[[0, 2, 3, 5, 6, 7]]).all()
    assert torch.isneginf(res.g[2]) and torch.isfinite(res.g[[0, 1, 3, 4, 5]]).all()
    P = plan(S, s, res.f, res.g)
    torch.testing.assert_close(P.sum(1), r, atol=1e-10, rtol=0)
    torch.testing.assert_close(P.sum(0), c, atol=1e-10, rtol=0)
    # Same plan as the problem with those rows and columns deleted.
    keep_r = torch.tensor([0, 2, 3, 5, 6, 7])
    keep_c = torch.tensor([0, 1, 3, 4, 5])
    sub = ref.sinkhorn(
        S[keep_r][:, keep_c], s, row_mass=r[keep_r], col_mass=c[keep_c], n_iters=5000, tol=1e-13, check_every=1
    )
    torch.testing.assert_close(P[keep_r][:, keep_c], plan(S[keep_r][:, keep_c], s, sub.f, sub.g), atol=1e-10, rtol=0)


def test_zero_mass_with_n_iters_zero():
    S = randn(3, 4, seed=9)
    res = ref.sinkhorn(S, 1.0, row_mass=[1.0, 0.0, 2.0], col_mass=[1.0, 1.0, 0.0, 1.0], n_iters=0)
    assert res.n_iters == 0
    assert res.f.tolist() == [0.0, -math.inf, 0.0]
    assert res.g.tolist() == [0.0, 0.0, -math.inf, 0.0]
    L = S.clone()
    L[:, 2] = -math.inf
    row = torch.exp(torch.logsumexp(L, 1))
    expected = (abs(row[0] - 1.0) + abs(row[2] - 2.0)) / 3.0
    assert math.isclose(res.error, float(expected), rel_tol=1e-12)


def test_masked_entries_allowed():
    S = randn(5, 5, seed=10)
    masked = ([0, 0, 2, 4], [3, 4, 0, 1])
    S[masked] = -math.inf
    res = ref.sinkhorn(S, 1.0, n_iters=5000, tol=1e-13, check_every=1)
    P = plan(S, 1.0, res.f, res.g)
    assert (P[masked] == 0).all()
    torch.testing.assert_close(P.sum(1), torch.ones(5, dtype=F64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n_iters", [0, 1, 10])
def test_infeasible_row(n_iters):
    S = randn(6, 5, seed=11)
    S[3] = -math.inf
    with pytest.raises(ValueError, match=r"row 3\b"):
        ref.sinkhorn(S, 1.0, n_iters=n_iters)
    # ... but with zero mass that row is simply removed.
    r = torch.ones(6, dtype=F64)
    r[3] = 0.0
    res = ref.sinkhorn(S, 1.0, row_mass=r, n_iters=n_iters)
    assert torch.isneginf(res.f[3]) and not torch.isnan(res.f).any() and not torch.isnan(res.g).any()


def test_infeasible_row_only_reaching_zero_mass_column():
    S = randn(4, 3, seed=12)
    S[3, :2] = -math.inf  # row 3 reaches only column 2, which is removed
    with pytest.raises(ValueError, match=r"row 3\b"):
        ref.sinkhorn(S, 1.0, col_mass=[2.0, 2.0, 0.0])


def test_infeasible_column():
    S = randn(5, 6, seed=13)
    S[:, 2] = -math.inf
    with pytest.raises(ValueError, match=r"column 2\b"):
        ref.sinkhorn(S, 1.0, n_iters=3)
    c = torch.ones(6, dtype=F64)
    c[2] = 0.0
    res = ref.sinkhorn(S, 1.0, col_mass=c, row_mass=torch.ones(5, dtype=F64), n_iters=3)
    assert torch.isneginf(res.g[2]) and not torch.isnan(res.f).any()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_posinf_rejected(bad):
    S = randn(3, 3, seed=14)
    S[1, 1] = bad
    with pytest.raises(ValueError):
        ref.sinkhorn(S)
    with pytest.raises(ValueError):
        ref.ncl_loss(S)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf])
def test_bad_scale(scale):
    with pytest.raises(ValueError):
        ref.sinkhorn(randn(2, 2), scale)


def test_early_stopping():
    S = cosine(30, 8, 15) @ cosine(20, 8, 16).T
    res = ref.sinkhorn(S, 10.0, n_iters=1000, tol=1e-6, check_every=10)
    assert res.n_iters < 1000 and res.n_iters % 10 == 0
    assert res.error <= 1e-6
    # It stopped at the first check that passed.
    before = ref.sinkhorn(S, 10.0, n_iters=res.n_iters - 10, tol=None)
    assert before.error > 1e-6
    # tol=None runs exactly n_iters, and the returned error is that of the returned pair.
    fixed = ref.sinkhorn(S, 10.0, n_iters=37, tol=None)
    assert fixed.n_iters == 37
    assert fixed.error == ref.sinkhorn_error(S, 10.0, fixed.f, fixed.g)
    # a check_every that never divides k: no early stop.
    assert ref.sinkhorn(S, 10.0, n_iters=25, tol=1.0, check_every=30).n_iters == 25
    assert ref.sinkhorn(S, 10.0, n_iters=25, tol=1.0, check_every=1).n_iters == 1


def test_scale_tensor_and_float32():
    S = randn(9, 7, seed=17)
    a = ref.sinkhorn(S, 4.0, n_iters=20, tol=None)
    b = ref.sinkhorn(S, torch.tensor(4.0, requires_grad=True), n_iters=20, tol=None)
    torch.testing.assert_close(a.f, b.f, rtol=0, atol=0)
    c = ref.sinkhorn(S.float(), 4.0, n_iters=20, tol=None, dtype=torch.float32)
    assert c.f.dtype == torch.float32 and c.g.dtype == torch.float32
    torch.testing.assert_close(c.f.double(), a.f, atol=1e-4, rtol=1e-4)


def test_sinkhorn_embeddings():
    x, y = cosine(11, 5, 18), cosine(7, 5, 19)
    a = ref.sinkhorn_embeddings(x.float(), y.float(), 3.0, n_iters=30, tol=None)
    b = ref.sinkhorn(x.float().double() @ y.float().double().T, 3.0, n_iters=30, tol=None)
    torch.testing.assert_close(a.f, b.f, rtol=0, atol=0)
    torch.testing.assert_close(a.g, b.g, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 20.0),
)
def test_property_columns_exact_after_each_iteration(n, m, seed, scale):
    S = randn(n, m, seed=seed)
    r = rand_mass(n, seed + 1)
    c = rand_mass(m, seed + 2, total=float(r.sum()))
    res = ref.sinkhorn(S, scale, row_mass=r, col_mass=c, n_iters=3, tol=None)
    P = plan(S, scale, res.f, res.g)
    torch.testing.assert_close(P.sum(0), c, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()


# --------------------------------------------------------------------------- loss


def test_default_targets():
    y, z = ref.default_targets(5, 3)
    assert y.tolist() == [0, 1, 2, -1, -1] and z.tolist() == [0, 1, 2]
    y, z = ref.default_targets(2, 4)
    assert y.tolist() == [0, 1] and z.tolist() == [0, 1, -1, -1]
    assert y.dtype == torch.int64 and z.dtype == torch.int64


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_identity_at_zero_iterations(scale):
    n = 9
    S = cosine(n, 6, 20) @ cosine(n, 6, 21).T
    L = scale * S
    labels = torch.arange(n)
    clip = 0.5 * (F.cross_entropy(L, labels) + F.cross_entropy(L.T, labels))
    loss = ref.ncl_loss(S, scale, n_iters=0)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, clip, rtol=1e-13, atol=0)
    # Same with explicit zero potentials.
    z = torch.zeros(n, dtype=F64)
    torch.testing.assert_close(ref.ncl_loss(S, scale, f=z, g=z), clip, rtol=1e-13, atol=0)


def test_loss_by_loops_rectangular_queue():
    n, m = 7, 4  # 3 queued rows take part in normalization only
    S = randn(n, m, seed=22)
    s = 2.5
    f = randn(n, seed=23)
    g = randn(m, seed=24)
    w = (0.3, 0.9)
    loss = ref.ncl_loss(S, s, f=f, g=g, weights=w)
    L = (s * S).tolist()
    fr, gr = f.tolist(), g.tolist()
    row = [math.log(sum(math.exp(L[i][j] + gr[j]) for j in range(m))) - L[i][i] - gr[i] for i in range(4)]
    col = [math.log(sum(math.exp(L[i][j] + fr[i]) for i in range(n))) - L[j][j] - fr[j] for j in range(m)]
    expected = w[0] * sum(row) / 4 + w[1] * sum(col) / m
    assert math.isclose(loss.item(), expected, rel_tol=1e-13)


def test_loss_custom_targets_and_empty_sets():
    S = randn(4, 3, seed=25)
    y = torch.tensor([2, -1, 0, 2])
    z = torch.tensor([-1, -1, -1])
    f, g = randn(4, seed=26), randn(3, seed=27)
    loss = ref.ncl_loss(S, 1.5, row_targets=y, col_targets=z, f=f, g=g)
    L = 1.5 * S
    lse = torch.logsumexp(L + g, 1)
    rows = [0, 2, 3]
    expected = 0.5 * sum(float(lse[i] - L[i, y[i]] - g[y[i]]) for i in rows) / 3  # empty C contributes 0
    assert math.isclose(loss.item(), expected, rel_tol=1e-13)
    Sg = S.clone().requires_grad_()
    ref.ncl_loss(Sg, 1.5, row_targets=torch.full((4,), -1), col_targets=z, f=f, g=g).backward()
    assert (Sg.grad == 0).all()


def test_loss_input_errors():
    S = randn(3, 3)
    with pytest.raises(ValueError):
        ref.ncl_loss(S, f=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError):
        ref.ncl_loss(S, g=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError):
        ref.ncl_loss(S, row_targets=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError):
        ref.ncl_loss(S, col_targets=torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError):
        ref.ncl_loss(S, weights=(1.0,))


def test_loss_solved_potentials_match_sinkhorn_and_are_invariant_to_shift():
    S = randn(6, 8, seed=28)
    r = rand_mass(6, 29)
    res = ref.sinkhorn(S, 3.0, row_mass=r, n_iters=4, tol=None)
    a = ref.ncl_loss(S, 3.0, row_mass=r)
    b = ref.ncl_loss(S, 3.0, f=res.f, g=res.g)
    assert a.item() == b.item()
    # Each term is invariant to a constant shift of its own potential.
    c = ref.ncl_loss(S, 3.0, f=res.f + 2.0, g=res.g - 7.0)
    assert math.isclose(c.item(), a.item(), rel_tol=1e-13)


def _grad_case(seed, n=6, m=5):
    S = randn(n, m, seed=seed)
    f = randn(n, seed=seed + 1)
    g = randn(m, seed=seed + 2)
    return S, f, g


def test_gradcheck_given_potentials():
    S, f, g = _grad_case(30)
    S.requires_grad_()
    s = torch.tensor(1.7, dtype=F64, requires_grad=True)
    y = torch.tensor([1, -1, 0, 4, 2, -1])
    z = torch.tensor([0, 5, -1, 3, 2])
    fn = lambda S, s: ref.ncl_loss(S, s, f=f, g=g, row_targets=y, col_targets=z, weights=(0.4, 0.8))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (S, s))


def test_gradcheck_solved_potentials():
    S, _, _ = _grad_case(31, 5, 7)
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)
    res = ref.sinkhorn(S, 2.0, n_iters=4, tol=None)
    S.requires_grad_()
    assert torch.autograd.gradcheck(lambda S, s: ref.ncl_loss(S, s, f=res.f, g=res.g), (S, s))
    # n_iters = 0: potentials do not depend on S, so the solved loss itself is gradcheck-able.
    assert torch.autograd.gradcheck(lambda S, s: ref.ncl_loss(S, s, n_iters=0), (S, s))


@pytest.mark.parametrize("shape,solved", [((6, 6), True), ((9, 5), True), ((4, 7), False)])
def test_ncl_grad_equals_autograd(shape, solved):
    n, m = shape
    S, f, g = _grad_case(32, n, m)
    if solved:
        res = ref.sinkhorn(S, 3.0, n_iters=4, tol=None)
        f, g = res.f, res.g
    y = torch.randint(-1, m, (n,), generator=gen(33))
    z = torch.randint(-1, n, (m,), generator=gen(34))
    w = (0.7, 0.2)
    Sg = S.clone().requires_grad_()
    s = torch.tensor(3.0, dtype=F64, requires_grad=True)
    kw = dict(row_targets=y, col_targets=z, weights=w)
    if solved:  # f, g from the loss's own Sinkhorn: stop-gradient
        loss = ref.ncl_loss(Sg, s, n_iters=4, **kw)
    else:
        loss = ref.ncl_loss(Sg, s, f=f, g=g, **kw)
    loss.backward()
    G = ref.ncl_grad(S, 3.0, f, g, y, z, w)
    torch.testing.assert_close(3.0 * G, Sg.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((G * S).sum(), s.grad, rtol=1e-12, atol=1e-14)


def test_ncl_grad_default_targets_rows_sum():
    # Each term of G is (softmax - one-hot): rows of the row term and columns of the col term sum to 0.
    S, f, g = _grad_case(35, 5, 5)
    Gr = ref.ncl_grad(S, 2.0, f, g, weights=(1.0, 0.0))
    Gc = ref.ncl_grad(S, 2.0, f, g, weights=(0.0, 1.0))
    torch.testing.assert_close(Gr.sum(1), torch.zeros(5, dtype=F64), atol=1e-15, rtol=0)
    torch.testing.assert_close(Gc.sum(0), torch.zeros(5, dtype=F64), atol=1e-15, rtol=0)


def test_masked_entries_have_zero_gradient():
    S = randn(5, 5, seed=36)
    S[0, 3] = -math.inf
    S[4, 1] = -math.inf
    Sg = S.clone().requires_grad_()
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)
    loss = ref.ncl_loss(Sg, s)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(Sg.grad).all() and torch.isfinite(s.grad)
    assert Sg.grad[0, 3] == 0 and Sg.grad[4, 1] == 0
    res = ref.sinkhorn(S, 2.0, n_iters=4, tol=None)
    G = ref.ncl_grad(S, 2.0, res.f, res.g)
    torch.testing.assert_close(2.0 * G, Sg.grad, rtol=1e-12, atol=1e-14)
    finite = torch.isfinite(S)
    torch.testing.assert_close((G[finite] * S[finite]).sum(), s.grad, rtol=1e-12, atol=1e-14)


def test_ncl_loss_embeddings():
    x = cosine(6, 4, 37).requires_grad_()
    y = cosine(8, 4, 38).requires_grad_()
    loss = ref.ncl_loss_embeddings(x, y, 5.0)
    loss.backward()
    S = (x @ y.T).detach()
    assert loss.item() == ref.ncl_loss(S, 5.0).item()
    res = ref.sinkhorn(S, 5.0, n_iters=4, tol=None)
    G = ref.ncl_grad(S, 5.0, res.f, res.g)
    torch.testing.assert_close(x.grad, 5.0 * G @ y.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y.grad, 5.0 * G.T @ x.detach(), rtol=1e-12, atol=1e-14)


def test_loss_float32_evaluation():
    S = randn(7, 7, seed=39).float()
    a = ref.ncl_loss(S, 10.0)
    b = ref.ncl_loss(S, 10.0, dtype=torch.float32)
    assert b.dtype == torch.float32
    assert math.isclose(a.item(), b.item(), rel_tol=1e-5)


@pytest.mark.parametrize("temperature", [1e-3, 1e-1, 10.0])
def test_extreme_temperatures_stay_finite(temperature):
    S = cosine(12, 6, 40) @ cosine(10, 6, 41).T
    Sg = S.clone().requires_grad_()
    loss = ref.ncl_loss(Sg, 1.0 / temperature)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(Sg.grad).all()


def test_apply_biases():
    S = randn(3, 4, seed=42)
    f, g = randn(3, seed=43), randn(4, seed=44)
    out = ref.apply_biases(S, 2.0, f, g)
    for i in range(3):
        for j in range(4):
            assert math.isclose(out[i, j].item(), 2.0 * S[i, j].item() + f[i].item() + g[j].item(), rel_tol=1e-15)
    torch.testing.assert_close(ref.apply_biases(S, 2.0), 2.0 * S)
    torch.testing.assert_close(ref.apply_biases(S, 2.0, g=g), 2.0 * S + g)
    assert out.data_ptr() != S.data_ptr()


# --------------------------------------------------------------------------- retrieval


def test_ranks_tie_counts_against():
    sc = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.2, 0.1]])
    assert ref.ranks(sc, torch.tensor([0, 2, 0])).tolist() == [2, 2, 1]
    assert ref.ranks(sc, torch.tensor([1, 0, 2])).tolist() == [2, 3, 3]
    assert ref.ranks(sc, torch.tensor([0, 2, 0])).dtype == torch.int64


def test_ranks_several_positives():
    sc = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])
    t = torch.tensor([[0, 2], [3, -1]])
    # row 0: positive 0 has rank 4, positive 2 rank 2 -> 2; row 1: positive 3 has rank 4.
    assert ref.ranks(sc, t).tolist() == [2, 4]
    with pytest.raises(ValueError):
        ref.ranks(sc, torch.tensor([[0, 2], [-1, -1]]))


def test_metrics_by_hand():
    out = ref.metrics(torch.tensor([1, 2, 5, 11, 60, 1]))
    assert set(out) == {"R@1", "R@5", "R@10", "R@50", "MdR", "MnR"}
    assert math.isclose(out["R@1"], 100 * 2 / 6)
    assert math.isclose(out["R@5"], 100 * 4 / 6)
    assert math.isclose(out["R@10"], 100 * 4 / 6)
    assert math.isclose(out["R@50"], 100 * 5 / 6)
    assert out["MdR"] == 3.5
    assert math.isclose(out["MnR"], 80 / 6)
    assert all(type(v) is float for v in out.values())


def test_targets_helpers():
    c2v = [0, 0, 1, 2, 1]
    assert ref.text_to_video_targets(c2v).tolist() == c2v
    assert ref.video_to_text_targets(c2v, 4).tolist() == [[0, 1], [2, 4], [3, -1], [-1, -1]]
    assert ref.video_to_text_targets(c2v, 3).tolist() == [[0, 1], [2, 4], [3, -1]]
    # video-to-text rank = best caption's rank
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.6, 0.4], [0.0, 0.1, 0.9], [0.3, 0.7, 0.0]])
    v2t = ref.ranks(sim.T, ref.video_to_text_targets(c2v, 3))
    assert v2t.tolist() == [1, 2, 1]


def test_gallery_bias_ncl_equals_sinkhorn():
    B, Y = cosine(20, 5, 45), cosine(8, 5, 46)
    bias = ref.gallery_bias(B, Y, 4.0, method="ncl", n_iters=300, tol=1e-8)
    res = ref.sinkhorn(B @ Y.T, 4.0, row_mass=torch.ones(20, dtype=F64), col_mass=torch.full((8,), 20 / 8, dtype=F64),
                       n_iters=300, tol=1e-8)
    torch.testing.assert_close(bias, res.g, rtol=0, atol=0)
    # The bias balances the bank's retrievals: each item receives K / M.
    P = torch.softmax(4.0 * B @ Y.T + bias, dim=1)
    torch.testing.assert_close(P.sum(0), torch.full((8,), 2.5, dtype=F64), atol=1e-6, rtol=0)
    Q = cosine(3, 5, 47)
    torch.testing.assert_close(ref.scores(Q, Y, 4.0, bias), 4.0 * Q @ Y.T + bias[None, :])
    torch.testing.assert_close(ref.scores(Q, Y, 4.0), 4.0 * Q @ Y.T)


def test_gallery_bias_qbnorm_by_hand():
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    Y = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    bias = ref.gallery_bias(B, Y, 2.0, method="qbnorm")
    # <b, y>: [[1, .5], [0, .5]]
    assert math.isclose(bias[0].item(), -math.log(math.exp(2.0) + math.exp(0.0)), rel_tol=1e-14)
    assert math.isclose(bias[1].item(), -math.log(2 * math.exp(1.0)), rel_tol=1e-14)
    with pytest.raises(ValueError):
        ref.gallery_bias(B, Y, method="other")


def test_dual_softmax_by_hand():
    sim = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    out = ref.dual_softmax_scores(sim, 1.0)
    e = math.exp
    expected = [
        [1.0 * e(1) / (e(1) + e(3)), 2.0 * e(2) / (e(2) + e(0))],
        [3.0 * e(3) / (e(1) + e(3)), 0.0],
    ]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-14)


def test_qbnorm_dynamic_picks_branch():
    Y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    B = torch.tensor([[0.9, 0.1], [0.8, -0.2]])  # both bank queries' top-1 is item 0: A = {0}
    Q = torch.tensor([[1.0, 0.2], [0.1, 1.0], [-1.0, 0.3]])  # top-1: item 0, item 1, item 2
    beta = 3.0
    out = ref.qbnorm_dynamic_scores(Q, Y, B, beta)
    raw = (Q @ Y.T).double()
    bs = (B @ Y.T).double()
    for j in range(3):
        is_score = beta * raw[0, j].item() - math.log(sum(math.exp(beta * bs[b, j].item()) for b in range(2)))
        assert math.isclose(out[0, j].item(), is_score, rel_tol=1e-12)
    torch.testing.assert_close(out[1:], raw[1:], rtol=0, atol=0)


def test_end_to_end_retrieval_bias_improves_hub_case():
    # Item 0 is a hub close to everything; the bank-based biases push it down.
    Y = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    Y = Y / Y.norm(dim=1, keepdim=True)
    Q = torch.eye(3, dtype=F64) + 1.5 * torch.ones(3, 3, dtype=F64) / math.sqrt(3)
    Q = Q / Q.norm(dim=1, keepdim=True)  # each query's nearest item is the hub
    t = torch.tensor([1, 2, 3])
    plain = ref.ranks(ref.scores(Q, Y, 10.0), t)
    for method in ("ncl", "qbnorm"):
        bias = ref.gallery_bias(Q, Y, 10.0, method=method)
        better = ref.ranks(ref.scores(Q, Y, 10.0, bias), t)
        assert plain.tolist() == [2, 2, 2] and better.tolist() == [1, 1, 1]
