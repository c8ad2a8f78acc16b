"""sinkhorn / sinkhorn_embeddings on every CPU backend against the float64 oracle."""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref

from conftest import STORAGE_DTYPES, assert_close, random_embeddings, random_scores, rel_err

SHAPES = [(1, 1), (1, 7), (7, 1), (7, 5), (67, 45), (45, 67), (1031, 67)]


def _both_refs(fn, *args, **kw):
    return fn(*args, **kw, dtype=torch.float64), fn(*args, **kw, dtype=torch.float32)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_iterations_match_oracle(backend, dtype, shape):
    S = random_scores(*shape, dtype, seed=sum(shape))
    out = nk.sinkhorn(S, 10.0, n_iters=15, tol=None, backend=backend)
    r64, r32 = _both_refs(ref.sinkhorn, S, 10.0, n_iters=15, tol=None)
    assert out.n_iters == 15
    expect = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.f.dtype == out.g.dtype == expect
    assert_close(out.f, r64.f, r32.f, dtype, "f")
    assert_close(out.g, r64.g, r32.g, dtype, "g")
    assert abs(float(out.error) - r64.error) <= 1e-5 + 2 * abs(r32.error - r64.error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_strided_view(backend, dtype):
    S = random_scores(67, 45, dtype, strided=True, seed=3)
    assert S.stride(0) > S.shape[1]
    before = S.clone()
    out = nk.sinkhorn(S, 5.0, n_iters=10, tol=None, backend=backend)
    r64, r32 = _both_refs(ref.sinkhorn, S.contiguous(), 5.0, n_iters=10, tol=None)
    assert_close(out.f, r64.f, r32.f, dtype, "f")
    assert_close(out.g, r64.g, r32.g, dtype, "g")
    assert torch.equal(S, before)  # sinkhorn never writes its input


def test_many_chunks_equal_one(backend, small_chunks):
    S = random_scores(67, 45, torch.float32, seed=4)
    out = nk.sinkhorn(S, 8.0, n_iters=12, tol=None, backend=backend)
    r64 = ref.sinkhorn(S, 8.0, n_iters=12, tol=None)
    assert rel_err(out.f, r64.f) < 1e-5 and rel_err(out.g, r64.g) < 1e-5


def test_masses_masks_and_warm_start(backend):
    S = random_scores(40, 23, torch.float32, seed=5)
    S[3, ::2] = float("-inf")
    S[:, 7] = float("-inf")
    S[:, 7][::3] = 0.1            # column 7 lives on every third row only
    gen = torch.Generator().manual_seed(1)
    r = torch.rand(40, generator=gen) + 0.5
    c = torch.rand(23, generator=gen) + 0.5
    c = c * r.sum() / c.sum()
    init_g = torch.randn(23, generator=gen)
    kw = dict(row_mass=r, col_mass=c, n_iters=25, tol=None, init_g=init_g)
    out = nk.sinkhorn(S, 6.0, backend=backend, **kw)
    r64 = ref.sinkhorn(S, 6.0, **kw)
    assert rel_err(out.f, r64.f) < 1e-5 and rel_err(out.g, r64.g) < 1e-5


def test_zero_mass_rows_and_columns(backend):
    S = random_scores(9, 6, torch.float32, seed=6)
    S[2] = float("-inf")           # fully masked, but it has no mass: fine
    S[:, 4] = float("-inf")
    r = torch.ones(9)
    r[2] = 0
    c = torch.full((6,), 8 / 5)
    c[4] = 0
    out = nk.sinkhorn(S, 3.0, row_mass=r, col_mass=c, n_iters=200, tol=1e-7,
                      backend=backend)
    assert out.f[2] == float("-inf") and out.g[4] == float("-inf")
    assert torch.isfinite(out.f[r > 0]).all() and torch.isfinite(out.g[c > 0]).all()
    P = torch.exp(3.0 * S.double() + out.f.double()[:, None] + out.g.double()[None])
    torch.testing.assert_close(P.sum(1), r.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(P.sum(0), c.double(), atol=1e-5, rtol=0)
    r64 = ref.sinkhorn(S, 3.0, row_mass=r, col_mass=c, n_iters=200, tol=1e-7)
    assert out.n_iters == r64.n_iters
    assert rel_err(out.f, r64.f) < 1e-5


def test_early_stop_matches_oracle(backend):
    S = random_scores(50, 30, torch.float64, seed=7)
    out = nk.sinkhorn(S, 4.0, n_iters=500, tol=1e-8, check_every=7, backend=backend)
    r64 = ref.sinkhorn(S, 4.0, n_iters=500, tol=1e-8, check_every=7)
    assert out.n_iters == r64.n_iters < 500 and out.n_iters % 7 == 0
    assert float(out.error) <= 1e-8
    assert rel_err(out.f, r64.f) < 1e-10


def test_not_converging_warns(backend):
    S = random_scores(30, 20, torch.float32, seed=8, scale=3.0)
    with pytest.warns(nk.SinkhornConvergenceWarning, match="did not reach"):
        out = nk.sinkhorn(S, 10.0, n_iters=3, tol=1e-9, backend=backend)
    assert out.n_iters == 3 and float(out.error) > 1e-9


def test_zero_iterations(backend):
    S = random_scores(5, 4, torch.float32)
    g0 = torch.randn(4)
    out = nk.sinkhorn(S, 2.0, n_iters=0, init_g=g0, backend=backend)
    r64 = ref.sinkhorn(S, 2.0, n_iters=0, init_g=g0)
    assert out.n_iters == 0 and torch.equal(out.f, torch.zeros(5))
    torch.testing.assert_close(out.g, g0)
    assert abs(float(out.error) - r64.error) < 1e-5


def test_scale_tensor_and_float_agree(backend):
    S = random_scores(11, 13, torch.float32, seed=9)
    a = nk.sinkhorn(S, 7.0, n_iters=5, tol=None, backend=backend)
    b = nk.sinkhorn(S, torch.tensor(7.0, requires_grad=True), n_iters=5, tol=None,
                    backend=backend)
    assert torch.equal(a.f, b.f) and torch.equal(a.g, b.g)
    assert not b.f.requires_grad


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 40), (67, 45, 40)])
def test_embeddings_match_oracle_and_dense(backend, dtype, shape, small_chunks):
    n, m, d = shape
    x, y = random_embeddings(n, m, d, dtype, seed=n)
    out = nk.sinkhorn_embeddings(x, y, 20.0, n_iters=10, tol=None, backend=backend)
    r64, r32 = _both_refs(ref.sinkhorn_embeddings, x, y, 20.0, n_iters=10, tol=None)
    assert_close(out.f, r64.f, r32.f, dtype, "f")
    assert_close(out.g, r64.g, r32.g, dtype, "g")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dense = nk.sinkhorn(x.to(acc) @ y.to(acc).T, 20.0, n_iters=10, tol=None, backend=backend)
    assert rel_err(out.f, dense.f) < 1e-5 and rel_err(out.g, dense.g) < 1e-5


def test_infeasible_row_and_column_are_named(backend):
    S = random_scores(6, 5, torch.float32)
    S[3] = float("-inf")
    with pytest.raises(ValueError, match="row 3"):
        nk.sinkhorn(S, backend=backend)
    S = random_scores(6, 5, torch.float32)
    S[:, 2] = float("-inf")
    with pytest.raises(ValueError, match="column 2"):
        nk.sinkhorn(S, backend=backend)


def test_cosine_scores_extreme_scales_stay_finite(backend):
    x, y = random_embeddings(33, 21, 16, torch.float32, seed=2)
    S = x @ y.T
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for scale in (1e-3, 0.1, 10.0, 1000.0):
            out = nk.sinkhorn(S.to(dtype), scale, n_iters=20, tol=None, backend=backend)
            assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all()
            assert torch.isfinite(out.error)


def test_strict_raises_instead_of_warning(backend):
    S = random_scores(30, 20, torch.float32, seed=8, scale=3.0)
    x, y = random_embeddings(30, 20, 8, torch.float32, seed=8)
    for call in (lambda **kw: nk.sinkhorn(S, 10.0, backend=backend, **kw),
                 lambda **kw: nk.sinkhorn_embeddings(x, y, 20.0, backend=backend, **kw)):
        with pytest.raises(nk.SinkhornConvergenceError, match="did not reach") as info:
            call(n_iters=3, tol=1e-12, strict=True)
        assert isinstance(info.value, RuntimeError)
        assert info.value.n_iters == 3 and info.value.error > 1e-12
        # converging, or tol=None, never raises
        out = call(n_iters=500, tol=1e-3, check_every=1, strict=True)
        assert float(out.error) <= 1e-3
        call(n_iters=3, tol=None, strict=True)


def test_strict_must_be_a_bool():
    with pytest.raises(TypeError, match="strict"):
        nk.sinkhorn(random_scores(3, 3, torch.float32), strict=1)
