"""Properties of the Sinkhorn solution and the loss that hold for any input (hypothesis).

Each property is checked on the backends usable on the CPU (``backend`` fixture): the
pure-PyTorch one and the C++ one. Inputs are small and drawn fresh by hypothesis; the
solutions are compared through gauge-invariant quantities where the property only holds up
to the ``(f + k, g - k)`` freedom of docs/math.md section 2.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ncl_kernels as nk
import python_ref as ref

# the Triton interpreter lane re-runs some of these with fewer examples (NCL_PROPERTY_EXAMPLES)
SETTINGS = settings(max_examples=int(os.environ.get("NCL_PROPERTY_EXAMPLES", "20")),
                    deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([torch.float32, torch.float64])
# tight enough that the plan of a converged solve is unique to well below the checks' bounds
CONVERGED = {"n_iters": 2000, "tol": 1e-7, "check_every": 5}


@st.composite
def problems(draw, max_side=9):
    n = draw(st.integers(1, max_side))
    m = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.5, 8.0))
    dtype = draw(DTYPES)
    gen = torch.Generator().manual_seed(seed)
    S = torch.nn.functional.normalize(torch.randn(n, 5, generator=gen), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(m, 5, generator=gen), dim=1).T
    return S.to(dtype), scale, seed


def plan(S, scale, f, g):
    """The transport plan ``exp(s*S + f_i + g_j)``: the same for every gauge of (f, g)."""
    return torch.exp(scale * S.double() + f.double()[:, None] + g.double()[None, :])


def tol_for(dtype):
    return 1e-9 if dtype == torch.float64 else 2e-5


@pytest.mark.filterwarnings("ignore::ncl_kernels.SinkhornConvergenceWarning")  # asserted below
@SETTINGS
@given(problem=problems(), mass_seed=st.integers(0, 1000))
def test_marginals_are_met(backend, problem, mass_seed):
    S, s, _ = problem
    n, m = S.shape
    gen = torch.Generator().manual_seed(mass_seed)
    r = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    c = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
    c = c * (r.sum() / c.sum())
    res = nk.sinkhorn(S, s, row_mass=r.to(S.dtype), col_mass=c.to(S.dtype), backend=backend,
                      **CONVERGED)
    P = plan(S, s, res.f, res.g)
    # after an iteration the column sums are exact; the row sums are within the error
    assert torch.allclose(P.sum(0), c, rtol=50 * tol_for(S.dtype), atol=0)
    row_err = float((P.sum(1) - r).abs().sum() / r.sum())
    assert row_err <= 1e-6 + 10 * tol_for(S.dtype)
    assert float(res.error) <= CONVERGED["tol"] or res.n_iters == CONVERGED["n_iters"]


@SETTINGS
@given(problem=problems(), row=st.integers(0, 100), shift=st.floats(-3.0, 3.0))
def test_shifting_one_row_shifts_only_its_potential(backend, problem, row, shift):
    S, s, _ = problem
    row %= S.shape[0]
    S2 = S.clone()
    S2[row] += shift
    a = nk.sinkhorn(S, s, n_iters=6, tol=None, backend=backend)
    b = nk.sinkhorn(S2, s, n_iters=6, tol=None, backend=backend)
    # the row pass absorbs the shift into f_row: s*S2[row] + f2[row] == s*S[row] + f[row]
    expected_f = a.f.double().clone()
    expected_f[row] -= s * float(S2[row, 0].double() - S[row, 0].double())
    atol = 1e-9 if S.dtype == torch.float64 else 1e-4 * (1 + s * 4)
    assert torch.allclose(b.f.double(), expected_f, atol=atol, rtol=0)
    assert torch.allclose(b.g.double(), a.g.double(), atol=atol, rtol=0)


@SETTINGS
@given(problem=problems(), perm_seed=st.integers(0, 1000))
def test_permuting_rows_and_columns_permutes_the_potentials(backend, problem, perm_seed):
    S, s, _ = problem
    gen = torch.Generator().manual_seed(perm_seed)
    p = torch.randperm(S.shape[0], generator=gen)
    q = torch.randperm(S.shape[1], generator=gen)
    a = nk.sinkhorn(S, s, n_iters=5, tol=None, backend=backend)
    b = nk.sinkhorn(S[p][:, q].contiguous(), s, n_iters=5, tol=None, backend=backend)
    atol = 1e-10 if S.dtype == torch.float64 else 1e-5 * (1 + s)
    assert torch.allclose(b.f.double(), a.f.double()[p], atol=atol, rtol=0)
    assert torch.allclose(b.g.double(), a.g.double()[q], atol=atol, rtol=0)


@pytest.mark.filterwarnings("ignore::ncl_kernels.SinkhornConvergenceWarning")  # n_iters may end it
@SETTINGS
@given(problem=problems())
def test_transposing_swaps_f_and_g(backend, problem):
    S, s, _ = problem
    n, m = S.shape
    # equal totals on both sides so that the transposed problem has the same masses
    r = torch.full((n,), 1.0 / n, dtype=S.dtype)
    c = torch.full((m,), 1.0 / m, dtype=S.dtype)
    a = nk.sinkhorn(S, s, row_mass=r, col_mass=c, backend=backend, **CONVERGED)
    b = nk.sinkhorn(S.T.contiguous(), s, row_mass=c, col_mass=r, backend=backend,
                    **CONVERGED)
    Pa = plan(S, s, a.f, a.g)
    Pb = plan(S.T, s, b.f, b.g)
    # both plans carry total mass 1 and meet their marginals to CONVERGED["tol"]
    atol = 1e-6 if S.dtype == torch.float64 else 5e-5
    assert torch.allclose(Pb, Pa.T, rtol=0, atol=atol)


@SETTINGS
@given(n=st.integers(1, 9), m=st.integers(1, 9), d=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 8.0), dtype=DTYPES)
def test_streaming_equals_dense(backend, n, m, d, seed, scale, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype) / d ** 0.5
    y = torch.randn(m, d, generator=gen).to(dtype) / d ** 0.5
    S = x.to(torch.float64) @ y.to(torch.float64).T
    dense = nk.sinkhorn(S.to(dtype), scale, n_iters=7, tol=None, backend=backend)
    stream = nk.sinkhorn_embeddings(x, y, scale, n_iters=7, tol=None, backend=backend)
    atol = 1e-9 if dtype == torch.float64 else 1e-4
    assert torch.allclose(stream.f.double(), dense.f.double(), atol=atol, rtol=0)
    assert torch.allclose(stream.g.double(), dense.g.double(), atol=atol, rtol=0)

    lx = nk.ncl_loss_embeddings(x, y, scale, backend=backend)
    ls = nk.ncl_loss(S.to(dtype), scale, backend=backend)
    assert abs(float(lx) - float(ls)) <= atol * (1 + abs(float(ls)))


def clip_loss(S, scale):
    """CLIP's symmetric InfoNCE on the square block, written the obvious way."""
    L = scale * S.double()
    k = min(L.shape)
    idx = torch.arange(k)
    rows = torch.nn.functional.cross_entropy(L[:k], idx, reduction="mean")
    cols = torch.nn.functional.cross_entropy(L[:, :k].T, idx, reduction="mean")
    return 0.5 * (rows + cols)


@SETTINGS
@given(problem=problems())
def test_loss_with_zero_iterations_is_clip(backend, problem):
    S, s, _ = problem
    if S.shape[0] != S.shape[1]:
        S = S[:min(S.shape), :min(S.shape)].contiguous()
    ours = nk.ncl_loss(S, s, n_iters=0, backend=backend)
    expected = clip_loss(S, s)
    tol = 1e-12 if S.dtype == torch.float64 else 1e-5
    assert abs(float(ours) - float(expected)) <= tol * (1 + abs(float(expected)))
    # and the oracle agrees with both
    assert abs(float(ref.ncl_loss(S, s, n_iters=0)) - float(expected)) <= 1e-12 * (
        1 + abs(float(expected)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shifted_gauge_gives_the_same_loss(backend, dtype):
    """Passing (f + k, g - k) instead of (f, g) does not change the loss (docs/math.md 2)."""
    S = torch.randn(7, 7, generator=torch.Generator().manual_seed(3)).to(dtype) * 0.3
    res = nk.sinkhorn(S, 5.0, n_iters=4, tol=None, backend=backend)
    a = nk.ncl_loss(S, 5.0, f=res.f, g=res.g, backend=backend)
    b = nk.ncl_loss(S, 5.0, f=res.f + 2.5, g=res.g - 2.5, backend=backend)
    assert abs(float(a) - float(b)) <= (1e-12 if dtype == torch.float64 else 1e-5)
