"""The CPU backend's beyond-the-seam kernels: the fused Sinkhorn step and the gradient's
one-exponential form, against the separate primitives and the float64 oracle, on every
instruction set this CPU runs."""

import math

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref

from conftest import STORAGE_DTYPES, assert_close, random_scores

if not nk.backends()["cpu"]["usable"]:
    pytest.skip("the C++ CPU module is not built", allow_module_level=True)

import test_cpu_backend  # noqa: E402  (after the skip: it needs the module too)

from ncl_kernels import _C_cpu
from ncl_kernels.backends.cpu import CpuBackend

be = test_cpu_backend.be  # the fixture that runs a test on every instruction set
acc_of = test_cpu_backend.acc_of

NEG_INF = float("-inf")
SHAPES = [(1, 1), (1, 1031), (7, 67), (67, 7), (1031, 67), (67, 1031), (300, 4099)]


def problem(shape, dtype, seed, scale=2.0, masks=True):
    n, m = shape
    S = random_scores(n, m, dtype, seed=seed, strided=True, scale=scale)
    gen = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)
    g = torch.randn(m, generator=gen, dtype=torch.float64).to(acc)
    log_r = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).log().to(acc)
    if masks:
        S = S.clone()
        S[torch.rand(S.shape, generator=gen) < 0.1] = NEG_INF
        if n > 3 and m > 3:
            S[1, :] = NEG_INF      # an infeasible row (positive mass, no finite logit)
            S[:, 2] = NEG_INF      # a column with no finite logit
            g[0] = NEG_INF         # a zero-mass column
            g[m - 1] = NEG_INF
            log_r[3] = NEG_INF     # a zero-mass row
    return S, g, log_r


def separate(be, S, scale, g, log_r):
    """What the fused step replaces: row pass, potential update, column pass."""
    lse_row = be.row_lse(S, scale, g)
    f = torch.where(log_r > NEG_INF, log_r - lse_row, torch.full_like(lse_row, NEG_INF))
    return f, lse_row, be.col_lse(S, scale, f)


def close(a, b, what, rtol):
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), what
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)), what
    keep = torch.isfinite(b)
    torch.testing.assert_close(a[keep].double(), b[keep].double(), rtol=rtol, atol=rtol,
                               msg=what)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sinkhorn_step_equals_the_separate_passes(be, dtype, shape):
    S, g, log_r = problem(shape, dtype, seed=sum(shape))
    before = S.clone()
    f, lse_row, lse_col = be.sinkhorn_step(S, 7.0, g, log_r)
    f2, lse_row2, lse_col2 = separate(be, S, 7.0, g, log_r)
    assert torch.equal(S, before)
    assert f.dtype == lse_row.dtype == lse_col.dtype == acc_of(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    close(lse_row, lse_row2, "lse_row", rtol)
    close(f, f2, "f", rtol)
    # f of the fused step is log_r - lse_row exactly as the driver would form it
    expect_f = torch.where(log_r > NEG_INF, log_r - lse_row, torch.full_like(lse_row, NEG_INF))
    assert torch.equal(f, expect_f)
    close(lse_col, lse_col2, "lse_col", rtol)


def lse64(L, v, dim):
    return torch.logsumexp(L + (v.double()[:, None] if dim == 0 else v.double()), dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0, 1000.0])
def test_sinkhorn_step_extreme_temperatures_fall_back_exactly(be, dtype, scale):
    # at scale 1000 most columns are nobody's near-argmax: their row-relative exps
    # underflow and the step must redo them exactly (few: strided; many: a column pass).
    # Against float64 LSEs of the same f and g, the fused step must be as accurate as the
    # separate passes (at scale 100 both are off by float32 roundings of logits ~ 100).
    S, g, log_r = problem((301, 517), dtype, seed=4, scale=1.0, masks=False)
    g = g * scale / 10
    for n_bad in (0, 3, 100):  # columns that only the exact path gets right at scale 1000
        Sx = S.clone()
        Sx[:, :n_bad] = -1.0
        Sx[0, :n_bad] = -0.5
        L = scale * Sx.double()
        ours, sep = be.sinkhorn_step(Sx, scale, g, log_r), separate(be, Sx, scale, g, log_r)
        for (_f, lse_row, lse_col), what in [(ours, "fused"), (sep, "separate")]:
            assert torch.isfinite(lse_row).all() and torch.isfinite(lse_col).all(), what
        errs = {}
        for (f, lse_row, lse_col), what in [(ours, "fused"), (sep, "separate")]:
            errs[what] = (float((lse_row.double() - lse64(L, g, 1)).abs().max()),
                          float((lse_col.double() - lse64(L, f, 0)).abs().max()))
        tiny = 1e-6 * (1 + scale)
        for k, name in enumerate(["lse_row", "lse_col"]):
            assert errs["fused"][k] <= 2 * errs["separate"][k] + tiny, (name, n_bad, errs)


def test_sinkhorn_step_nan_and_empty(be):
    S = torch.zeros(5, 40)
    S[2, 7] = float("nan")
    g, log_r = torch.zeros(40), torch.zeros(5)
    f, lse_row, lse_col = be.sinkhorn_step(S, 1.0, g, log_r)
    assert torch.isnan(lse_row[2]) and not torch.isnan(lse_row[[0, 1, 3, 4]]).any()
    assert torch.isnan(lse_col).all()  # f_2 is NaN, so every column sees it
    f, lse_row, lse_col = be.sinkhorn_step(torch.empty(0, 4), 1.0, torch.zeros(4),
                                           torch.zeros(0))
    assert torch.equal(lse_col, torch.full((4,), NEG_INF)) and f.numel() == 0
    f, lse_row, lse_col = be.sinkhorn_step(torch.empty(3, 0), 1.0, torch.zeros(0),
                                           torch.zeros(3))
    assert torch.equal(lse_row, torch.full((3,), NEG_INF))


def test_sinkhorn_step_single_column_cancels_like_the_driver():
    # one column: the column sum is a count (sum of r_i e_i / s_i with e = s = 1), and
    # finishing it with torch.log makes log(c) - LSE_col exactly 0, as with col_lse
    be = CpuBackend()
    S = random_scores(37, 1, torch.float32, seed=1)
    r = torch.ones(37)
    log_c = torch.log(r.sum().reshape(1))
    g = torch.zeros(1)
    f, _, _ = be.sinkhorn_step(S, 5.0, g, r.log())
    _, _, lse_col = be.sinkhorn_step(S, 5.0, g, r.log())
    f, _, lse_col = be.sinkhorn_step(S, 5.0, log_c - lse_col, r.log())
    f_sep, lse_row_sep, lse_col_sep = separate(be, S, 5.0, log_c - lse_col, r.log())
    assert torch.equal(lse_col, lse_col_sep)
    assert float(log_c - be.col_lse(S, 5.0, f)) == float(log_c - lse_col)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_sinkhorn_step_bitwise_equal_for_1_and_2_threads(be, dtype):
    S, g, log_r = problem((1031, 600), dtype, seed=9)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(be.sinkhorn_step(S, 5.0, g, log_r))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):  # bitwise (the infeasible row 1 makes NaNs: equal as NaN)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_driver_with_the_fused_step_matches_the_oracle(be, dtype):
    """The Sinkhorn loop written on sinkhorn_step (one read of S per iteration), as the
    driver would use it, against the float64 oracle (docs/math.md section 5)."""
    S = random_scores(67, 45, dtype, seed=3, scale=1.0)
    acc = acc_of(dtype)
    n, m = S.shape
    log_r, log_c = torch.zeros(n, dtype=acc), torch.full((m,), math.log(n / m), dtype=acc)
    g = torch.zeros(m, dtype=acc)
    for _ in range(10):
        f, _, lse_col = be.sinkhorn_step(S, 10.0, g, log_r)
        g = log_c - lse_col
    r64 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None)
    r32 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None, dtype=torch.float32)
    assert_close(f, r64.f, r32.f, dtype, "f")
    assert_close(g, r64.g, r32.g, dtype, "g")


# -- the gradient with one exponential per element -----------------------------------------

def _grad_inputs(shape, dtype, seed, scale):
    n, m = shape
    S = random_scores(n, m, dtype, seed=seed, strided=True, scale=1.0)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, m, (n,), generator=gen)
    z = torch.randint(0, n, (m,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.3] = -1
    z[torch.rand(m, generator=gen) < 0.3] = -1
    return S, y, z


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.01, 10.0, 100.0])
@pytest.mark.parametrize("n_iters", [0, 4])
def test_one_exp_gradient_within_tolerance_of_the_oracle(be, dtype, scale, n_iters):
    S0, y, z = _grad_inputs((131, 67), dtype, seed=5, scale=scale)
    grads = {}
    for one in (True, False):
        _C_cpu.set_one_exp(one)
        try:
            S = S0.clone().requires_grad_()
            nk.ncl_loss(S, scale, row_targets=y, col_targets=z, n_iters=n_iters,
                        backend="cpu").backward()
            grads[one] = S.grad
        finally:
            _C_cpu.set_one_exp(True)
    S64 = S0.clone().double().requires_grad_()
    ref.ncl_loss(S64, scale, row_targets=y, col_targets=z, n_iters=n_iters).backward()
    S32 = S0.clone().requires_grad_()  # the float32 reference on the same storage
    ref.ncl_loss(S32, scale, row_targets=y, col_targets=z, n_iters=n_iters,
                 dtype=torch.float32).backward()
    for one, grad in grads.items():
        assert_close(grad, S64.grad, S32.grad, dtype, f"dS one_exp={one}")


def test_one_exp_is_skipped_where_it_would_be_unsafe(be):
    # a column with a target but zero mass (g = -inf) and an LSE far off: the factorization
    # has no finite factor there, so the pass must use two exponentials and stay exact
    S, y, z = _grad_inputs((40, 30), torch.float32, seed=8, scale=1.0)
    f, g = torch.randn(40), torch.randn(30)
    g[3] = NEG_INF
    lse_row, lse_col = be.row_lse(S, 4.0, g), be.col_lse(S, 4.0, f)
    cr, cc = 0.01 * (y >= 0).float(), 0.02 * (z >= 0).float()
    outs = []
    for one in (True, False):
        _C_cpu.set_one_exp(one)
        try:
            out = torch.empty_like(S)
            ds = be.ncl_grad_(S, 4.0, f, g, lse_row, lse_col, cr, cc, y, z, out=out)
            outs.append((out, ds))
        finally:
            _C_cpu.set_one_exp(True)
    assert torch.equal(outs[0][0], outs[1][0]) and float(outs[0][1]) == float(outs[1][1])
    G = ref.ncl_grad(S, 4.0, f, g, y, z, (0.01 * (y >= 0).sum(), 0.02 * (z >= 0).sum()))
    assert torch.isfinite(outs[0][0]).all()
    torch.testing.assert_close(outs[0][0].double() / 4.0, G, rtol=1e-5, atol=1e-7)
