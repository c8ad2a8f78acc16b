"""The Triton backend against the float64 oracle: interpreter lane on CPU, suite on CUDA.

Three ways this module runs:

* ``TRITON_INTERPRET=1`` in the environment (set before Triton is imported): the kernels
  run in Triton's interpreter on CPU tensors. The ``backend`` fixture below then overrides
  conftest's with ``"triton"``, so the dense and streaming suites imported from
  ``test_sinkhorn`` / ``test_loss`` run through the public API on the Triton kernels, next
  to this module's own primitive-level tests (small blocks, masks, strides).
* Plain ``pytest`` on a machine without a GPU: ``test_interpreter_lane`` re-runs this
  module in a child ``pytest`` with ``TRITON_INTERPRET=1`` (the variable must be set before
  Triton's first import, and must not leak into the other tests of this session). Every
  other test here skips with a pointer to that lane.
* A CUDA device: the ``gpu``-marked tests at larger shapes, plus the benchmark entry
  points' smoke test.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from ncl_kernels.backends import get as get_backend
from ncl_kernels.backends.triton import interpreting

from conftest import ROOT, assert_close, child_env, random_embeddings, random_scores, rel_err

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERP = HAVE_TRITON and interpreting()
ON_GPU = HAVE_TRITON and not INTERP and torch.cuda.is_available()
LOW = [torch.float32, torch.bfloat16, torch.float16]

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")]

# The CPU suites, re-run here with backend="triton" (the fixture override below).
from test_loss import (  # noqa: E402,F401
    test_apply_biases_in_place,
    test_cosine_scores_extreme_scales_stay_finite as test_loss_extreme_scales,
    test_embedding_gradient_only_where_needed,
    test_embeddings_match_oracle_and_dense as test_loss_embeddings_match_oracle,
    test_inplace_backward_on_strided_view,
    test_inplace_backward_overwrites_exactly_when_asked,
    test_loss_and_gradients_match_oracle,
    test_masked_entries,
    test_targets_weights_masses_and_given_biases,
    test_upstream_gradient_is_applied,
    test_zero_iterations_is_clip,
)
from test_numerics import (  # noqa: E402,F401
    test_a_fully_masked_row_without_mass_is_solved,
    test_a_target_on_a_masked_score_is_refused,
    test_not_converging_warns_and_reports_the_error,
    test_results_are_bitwise_repeatable,
)
from test_properties import (  # noqa: E402,F401
    test_loss_with_zero_iterations_is_clip as test_property_zero_iterations_is_clip,
    test_permuting_rows_and_columns_permutes_the_potentials,
    test_shifting_one_row_shifts_only_its_potential,
    test_streaming_equals_dense as test_property_streaming_equals_dense,
)
from test_sinkhorn import (  # noqa: E402,F401
    test_cosine_scores_extreme_scales_stay_finite as test_sinkhorn_extreme_scales,
    test_embeddings_match_oracle_and_dense as test_sinkhorn_embeddings_match_oracle,
    test_fixed_iterations_match_oracle,
    test_infeasible_row_and_column_are_named,
    test_masses_masks_and_warm_start,
    test_row_strided_view,
    test_zero_mass_rows_and_columns,
)

_LANE = "runs in the interpreter lane (test_interpreter_lane, TRITON_INTERPRET=1)"


@pytest.fixture
def backend():
    """``"triton"`` for CPU tensors: only under the interpreter."""
    if not INTERP:
        pytest.skip(_LANE)
    return "triton"


def install(monkeypatch, **config):
    """A TritonBackend built with ``config``, installed as the registry's "triton" for one
    test (the public API's ``backend="triton"`` then runs it too)."""
    from ncl_kernels.backends import registry
    from ncl_kernels.backends.triton.backend import TritonBackend
    be = TritonBackend(**config)
    monkeypatch.setitem(registry._instances, "triton", be)  # (undone after the test)
    return be


@pytest.fixture
def be(request):
    """The backend object itself, for the primitive-level tests (configured by
    ``blocks`` when a test takes both)."""
    if not INTERP:
        pytest.skip(_LANE)
    if "blocks" in request.fixturenames:
        request.getfixturevalue("blocks")
    return get_backend("triton", torch.device("cpu"))


@pytest.fixture(params=[None, 16], ids=["default-blocks", "blocks16"])
def blocks(request, monkeypatch):
    """Default launch blocks, and every block capped at 16: many masked tiles."""
    if request.param is not None:
        install(monkeypatch, block_cap=request.param)


@pytest.mark.slow
@pytest.mark.skipif(INTERP or ON_GPU, reason="the lane itself (or a GPU) is running")
def test_interpreter_lane():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "test_triton.py"],
        # from tests/, not the root: `python -m` puts the working directory first on
        # sys.path, and the root's ncl_kernels/ is the source tree, not the installed package
        capture_output=True, text=True, cwd=str(ROOT / "tests"), timeout=900,
        env=child_env(TRITON_INTERPRET="1", NCL_PROPERTY_EXAMPLES="6"))
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and "failed" not in done.stdout, tail


@pytest.mark.skipif(INTERP or ON_GPU, reason="only without a GPU and interpreter")
def test_unusable_without_gpu_says_why():
    info = nk.backends()["triton"]
    assert info["built"] and not info["usable"] and info["devices"] == "cuda"
    assert "TRITON_INTERPRET" in info["why"]
    with pytest.raises(ValueError, match="not usable"):
        nk.sinkhorn(torch.randn(3, 4), backend="triton")


def test_report_under_the_interpreter(be):
    info = nk.backends()["triton"]
    assert {k: info[k] for k in ("built", "usable", "devices", "why")} == {
        "built": True, "usable": True, "devices": "cpu", "why": ""}
    assert be.name == "triton"


# -- primitives, one by one --------------------------------------------------------------
def _vectors(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    f, g = torch.randn(n, generator=gen), torch.randn(m, generator=gen)
    f[::5] = float("-inf")      # zero-mass rows/columns carry -inf potentials
    g[1::4] = float("-inf")
    return f, g


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 7), (67, 45), (45, 67)])
@pytest.mark.parametrize("strided", [False, True])
def test_row_and_col_lse(be, blocks, dtype, shape, strided):
    S = random_scores(*shape, dtype, seed=shape[0] + 3 * shape[1], strided=strided)
    S[0, :] = float("-inf")                      # an all-masked row ...
    S[:, -1] = float("-inf")                     # ... and column: LSE -inf
    f, g = _vectors(*shape, seed=1)
    for vec in (None, g):
        out = be.row_lse(S, 3.0, vec)
        assert out.dtype == torch.float32
        assert_close(out, ref.row_lse(S, 3.0, vec), ref.row_lse(S, 3.0, vec, dtype=torch.float32),
                     dtype, "row_lse")
    for vec in (None, f):
        out = be.col_lse(S, 3.0, vec)
        assert_close(out, ref.col_lse(S, 3.0, vec), ref.col_lse(S, 3.0, vec, dtype=torch.float32),
                     dtype, "col_lse")


def _grad_inputs(S, scale, seed):
    """Potentials, LSEs and coefficients as the loss hands them to ``ncl_grad_``."""
    N, M = S.shape
    sol = ref.sinkhorn(S, scale, n_iters=3, tol=None)
    f, g = sol.f.float(), sol.g.float()
    lse_row = ref.row_lse(S, scale, g, dtype=torch.float32).float()
    lse_col = ref.col_lse(S, scale, f, dtype=torch.float32).float()
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(-1, M, (N,), generator=gen)
    z = torch.randint(-1, N, (M,), generator=gen)
    cr = (y >= 0).float() * 0.3 / max(1, int((y >= 0).sum()))
    cc = (z >= 0).float() * 0.7 / max(1, int((z >= 0).sum()))
    return f, g, lse_row, lse_col, cr, cc, y, z


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (67, 45)])
def test_ncl_grad_out_of_place_in_place_and_sum_only(be, blocks, dtype, shape):
    S0 = random_scores(*shape, dtype, seed=7, strided=True)
    S0[-1, 1::3] = float("-inf")                 # masked entries: G = 0 there, no dscale
    args = _grad_inputs(S0, 6.0, seed=shape[0])
    f, g, _, _, _, _, y, z = args
    # the oracle's G (the coefficients above fold in weights 0.3 / 0.7)
    G64, G32 = (ref.ncl_grad(S0, 6.0, f, g, y, z, (0.3, 0.7), dtype=dt)
                for dt in (torch.float64, torch.float32))
    out = torch.empty(shape, dtype=dtype)
    S = S0.clone()
    ds = be.ncl_grad_(S, 6.0, *args, out=out)
    assert torch.equal(S, S0)
    assert_close(out, 6.0 * G64, (6.0 * G32).to(dtype), dtype, "s * G")
    finite = torch.isfinite(S0)
    S64 = S0.double().masked_fill(~finite, 0)
    S32 = S0.float().masked_fill(~finite, 0)
    assert_close(ds, (G64 * S64).sum(), (G32 * S32).sum(), dtype, "dscale")
    # in place over a strided view: each element read before written; the gaps untouched
    wide = torch.zeros(shape[0], shape[1] + 13, dtype=dtype)
    wide[:, :shape[1]] = S0
    view = wide[:, :shape[1]]
    ds_in = be.ncl_grad_(view, 6.0, *args, out=view)
    assert torch.equal(view, out) and float(ds_in) == float(ds)
    assert (wide[:, shape[1]:] == 0).all()
    # sum only: nothing written
    S = S0.clone()
    assert float(be.ncl_grad_(S, 6.0, *args, out=None)) == float(ds)
    assert torch.equal(S, S0)


def test_ncl_grad_row_offset_matches_column_targets(be):
    S = random_scores(30, 20, torch.float32, seed=9)
    args = list(_grad_inputs(S, 4.0, seed=9))
    full = torch.empty_like(S)
    ds = be.ncl_grad_(S, 4.0, *args, out=full)
    f, g, lse_row, lse_col, cr, cc, y, z = args
    top = torch.empty(10, 20)
    bottom = torch.empty(20, 20)
    ds1 = be.ncl_grad_(S[:10], 4.0, f[:10], g, lse_row[:10], lse_col, cr[:10], cc, y[:10], z,
                       out=top)
    ds2 = be.ncl_grad_(S[10:], 4.0, f[10:], g, lse_row[10:], lse_col, cr[10:], cc, y[10:], z,
                       out=bottom, row_offset=10)
    assert torch.equal(torch.cat([top, bottom]), full)
    assert rel_err(ds1 + ds2, ds) < 1e-6


@pytest.mark.parametrize("dtype", LOW)
def test_apply_biases_only_g_and_none(be, blocks, dtype):
    S0 = random_scores(67, 45, dtype, seed=10, strided=True)
    f, g = _vectors(67, 45, seed=2)
    for fv, gv in ((None, g), (None, None), (f, g)):
        S = S0.clone()
        nk.apply_biases_(S, 2.5, fv, gv, backend="triton")
        expect = ref.apply_biases(S0, 2.5, fv, gv, dtype=torch.float32).to(dtype)
        torch.testing.assert_close(S, expect, rtol=0, atol=0)


# -- streaming ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (67, 45, 40), (45, 67, 130)])
def test_row_and_col_lse_xy(be, blocks, dtype, shape):
    n, m, d = shape
    x, y = random_embeddings(n, m, d, dtype, seed=d)
    f, g = _vectors(n, m, seed=3)
    S32 = x.float() @ y.float().T
    S64 = x.double() @ y.double().T
    for vec in (None, g):
        assert_close(be.row_lse_xy(x, y, 9.0, vec), ref.row_lse(S64, 9.0, vec),
                     ref.row_lse(S32, 9.0, vec, dtype=torch.float32), dtype, "row_lse_xy")
    for vec in (None, f):
        assert_close(be.col_lse_xy(x, y, 9.0, vec), ref.col_lse(S64, 9.0, vec),
                     ref.col_lse(S32, 9.0, vec, dtype=torch.float32), dtype, "col_lse_xy")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1, 5), (67, 45, 40)])
def test_target_logits_round_as_the_lse_pass(be, blocks, dtype, shape):
    # The loss subtracts each target logit from the LSE that contains it and must cancel
    # it exactly (with one pair the loss is exactly 0). row_lse_xy with g = -inf but at
    # column j returns the LSE pass's own logits of column j, at their tile positions
    # (col_lse_xy with f = -inf but at row i: those of row i).
    n, m, d = shape
    x, y = random_embeddings(n, m, d, dtype, seed=d + 1)
    gen = torch.Generator().manual_seed(n)
    t = torch.randint(-1, m, (n,), generator=gen)
    u = torch.randint(-1, n, (m,), generator=gen)
    t[0], u[-1] = m - 1, 0
    t_row, t_col = be.target_logits_xy(x, y, 15.0, t, u)
    for tgt, ours, lse, size in ((t, t_row, be.row_lse_xy, m), (u, t_col, be.col_lse_xy, n)):
        for j in {size - 1, *tgt[tgt >= 0].unique()[:2].tolist()}:
            only_j = torch.full((size,), float("-inf"))
            only_j[j] = 0.0
            lines = tgt == j
            assert torch.equal(ours[lines], lse(x, y, 15.0, only_j)[lines]), j
    S64, S32 = x.double() @ y.double().T, x.float() @ y.float().T
    rows, cols = torch.arange(n), torch.arange(m)
    for keep, ours, at in ((t >= 0, t_row, (rows, t.clamp(min=0))),
                           (u >= 0, t_col, (u.clamp(min=0), cols))):
        assert_close(ours[keep], 15.0 * S64[at][keep], 15.0 * S32[at][keep], dtype, "targets")
    assert float(nk.ncl_loss_embeddings(x[:1], y[:1], 15.0, backend="triton")) == 0.0


@pytest.mark.parametrize("dtype", LOW)
def test_strided_embeddings_and_masked_d(be, blocks, dtype):
    # x: a column slice of a wider matrix (row stride 77); y: a transposed view (stride 1
    # between rows): any strides are read as they are, no copy is needed
    gen = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(67, 77, generator=gen), dim=1).to(dtype)[:, 3:43]
    y = torch.nn.functional.normalize(torch.randn(40, 45, generator=gen), dim=0).to(dtype).T
    assert x.stride() == (77, 1) and y.stride() == (1, 45)
    xs = x.detach().requires_grad_()
    ys = y.detach().requires_grad_()
    loss = nk.ncl_loss_embeddings(xs, ys, 11.0, backend="triton")
    loss.backward()
    refs = []
    for ref_dtype in (torch.float64, torch.float32):
        leaf_dtype = torch.float64 if ref_dtype == torch.float64 else dtype
        xr, yr = (t.detach().to(leaf_dtype).requires_grad_() for t in (x, y))
        value = ref.ncl_loss_embeddings(xr, yr, 11.0, dtype=ref_dtype)
        value.backward()
        refs.append((value.detach(), xr.grad, yr.grad))
    for name, ours, r64, r32 in zip(("loss", "dx", "dy"), (loss.detach(), xs.grad, ys.grad),
                                    *refs):
        assert_close(ours, r64, r32, dtype, name)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_ncl_grad_xy_against_dense_gradient(be, blocks, dtype, need):
    x, y = random_embeddings(67, 45, 40, dtype, seed=11)
    S = x.float() @ y.float().T
    args = _grad_inputs(S, 13.0, seed=12)
    dX, dY, ds = be.ncl_grad_xy(x, y, 13.0, *args, need_dx=need[0], need_dy=need[1])
    G = torch.empty_like(S)
    ds_dense = get_backend("torch", torch.device("cpu")).ncl_grad_(S, 13.0, *args, out=G)
    assert rel_err(ds, ds_dense) < 1e-5
    if need[0]:
        assert dX.dtype == dtype
        assert_close(dX, G.double() @ y.double(), (G @ y.float()).to(dtype), dtype, "dX")
    else:
        assert dX is None
    if need[1]:
        assert_close(dY, G.double().T @ x.double(), (G.T @ x.float()).to(dtype), dtype, "dY")
    else:
        assert dY is None


def test_wide_embedding_d1024(be):
    x, y = random_embeddings(20, 18, 1024, torch.bfloat16, seed=13)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = nk.ncl_loss_embeddings(xs, ys, 30.0, backend="triton")
    loss.backward()
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    ref.ncl_loss_embeddings(x64, y64, 30.0).backward()
    x32, y32 = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref.ncl_loss_embeddings(x32, y32, 30.0, dtype=torch.float32).backward()
    assert_close(xs.grad, x64.grad, x32.grad, torch.bfloat16, "dx")
    assert_close(ys.grad, y64.grad, y32.grad, torch.bfloat16, "dy")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1, 5), (7, 5, 3), (67, 45, 40)])
@pytest.mark.parametrize("programs", [1, 3])
def test_fused_sinkhorn_step_matches_two_passes(be, dtype, shape, programs, monkeypatch):
    # one launch per iteration: the row LSE and f as the two-pass form has them (same
    # bits), the column LSE from per-program partials merged in program order
    n, m, d = shape
    be = install(monkeypatch, programs=programs)
    x, y = random_embeddings(n, m, d, dtype, seed=n + d)
    x = x.T.contiguous().T                      # column-major: strides (1, n)
    r = torch.rand(n) + 0.5
    r[::4] = 0.0                                 # zero-mass rows: f = -inf
    log_r = torch.log(r)
    _, g = _vectors(n, m, seed=4)               # zero-mass columns carry g = -inf
    f, lse_row, lse_col = be.sinkhorn_step_xy(x, y, 7.0, g, log_r)
    assert torch.equal(lse_row, be.row_lse_xy(x, y, 7.0, g))
    assert torch.equal(f, torch.where(r > 0, log_r - lse_row, float("-inf")))
    S64, S32 = x.double() @ y.double().T, x.float() @ y.float().T
    assert_close(lse_col, ref.col_lse(S64, 7.0, f), ref.col_lse(S32, 7.0, f, dtype=torch.float32),
                 dtype, "lse_col")
    two_pass = be.col_lse_xy(x, y, 7.0, f)
    assert torch.equal(torch.isneginf(lse_col), torch.isneginf(two_pass))
    assert rel_err(lse_col, two_pass) < 1e-6
    again = be.sinkhorn_step_xy(x, y, 7.0, g, log_r)
    assert all(torch.equal(a, b) for a, b in zip(again, (f, lse_row, lse_col)))


def _solve_fused(be, x, y, scale, n_iters):
    """The Sinkhorn driver's iteration written on the fused step, as the driver can run it."""
    r = torch.ones(x.shape[0])
    c = torch.full((y.shape[0],), x.shape[0] / y.shape[0])
    g = torch.zeros(y.shape[0])
    for _ in range(n_iters):
        f, _, lse_col = be.sinkhorn_step_xy(x, y, scale, g, torch.log(r))
        g = torch.log(c) - lse_col
    return f, g


@pytest.mark.parametrize("dtype", LOW)
def test_sinkhorn_on_the_fused_step_matches_oracle(be, blocks, dtype):
    x, y = random_embeddings(45, 67, 24, dtype, seed=6)
    f, g = _solve_fused(be, x, y, 9.0, 5)
    r64 = ref.sinkhorn_embeddings(x, y, 9.0, n_iters=5, tol=None)
    r32 = ref.sinkhorn_embeddings(x, y, 9.0, n_iters=5, tol=None, dtype=torch.float32)
    assert_close(f, r64.f, r32.f, dtype, "f")
    assert_close(g, r64.g, r32.g, dtype, "g")


def test_persistent_programs_do_not_change_the_bits(be, monkeypatch):
    # row and column LSE passes: a block's result does not depend on which program ran it
    x, y = random_embeddings(67, 45, 40, torch.bfloat16, seed=7)
    _, g = _vectors(67, 45, seed=5)
    f, _ = _vectors(67, 45, seed=6)
    outs = [(b.row_lse_xy(x, y, 5.0, g), b.col_lse_xy(x, y, 5.0, f))
            for b in (install(monkeypatch, programs=p, block_cap=16) for p in (1, 2, 5))]
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("config", [{"grad_split": False}, {"grad_block_do": 16}],
                         ids=["single-G", "output-blocks-16"])
def test_ncl_grad_xy_configurations(dtype, config, monkeypatch):
    # the rounded-once G (one product) stays within docs/math.md section 5 on these
    # inputs; output blocks narrower than D form S once per block (several grid columns)
    if not INTERP:
        pytest.skip(_LANE)
    be = install(monkeypatch, **config)
    x, y = random_embeddings(67, 45, 40, dtype, seed=14)
    S = x.float() @ y.float().T
    args = _grad_inputs(S, 13.0, seed=15)
    f, g = args[0].clone(), args[1].clone()
    f[3], g[5] = float("-inf"), float("-inf")            # zero-mass row and column
    lse_row = ref.row_lse(S, 13.0, g, dtype=torch.float32).float()
    lse_col = ref.col_lse(S, 13.0, f, dtype=torch.float32).float()
    args = (f, g, lse_row, lse_col) + tuple(args[4:])
    dX, dY, ds = be.ncl_grad_xy(x, y, 13.0, *args)
    G = torch.empty_like(S)
    ds_dense = get_backend("torch", torch.device("cpu")).ncl_grad_(S, 13.0, *args, out=G)
    assert rel_err(ds, ds_dense) < 1e-5
    assert_close(dX, G.double() @ y.double(), (G @ y.float()).to(dtype), dtype, "dX")
    assert_close(dY, G.double().T @ x.double(), (G.T @ x.float()).to(dtype), dtype, "dY")
    again = be.ncl_grad_xy(x, y, 13.0, *args)
    assert torch.equal(again[0], dX) and torch.equal(again[1], dY) and float(again[2]) == float(ds)


def test_one_pair_loss_and_gradient_are_exactly_zero(be):
    # LSE over one entry is that entry, the softmax over it exactly 1: the loss and its
    # gradients cancel exactly when every pass forms the logit with the same bits
    for dtype in LOW:
        for d in (5, 40, 130):
            x, y = random_embeddings(1, 1, d, dtype, seed=d)
            xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
            s = torch.tensor(15.0, requires_grad=True)
            loss = nk.ncl_loss_embeddings(xs, ys, s, backend="triton")
            loss.backward()
            assert float(loss.detach()) == 0.0, (dtype, d)
            assert (xs.grad == 0).all() and (ys.grad == 0).all() and float(s.grad) == 0.0


def test_configuration_is_checked():
    from ncl_kernels.backends.triton.backend import TritonBackend
    for bad in ({"dot_precision": "fast"}, {"block_cap": 8}, {"grad_block_do": 48},
                {"programs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TritonBackend(**bad)


# -- CUDA: the same checks at larger shapes ----------------------------------------------
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (Triton not "
                                                  "interpreted)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1), (67, 45), (1031, 4099), (4099, 1031)])
def test_gpu_sinkhorn_and_loss(dtype, shape):
    S = random_scores(*shape, dtype, seed=shape[1], strided=True)
    out = nk.sinkhorn(S.cuda(), 10.0, n_iters=10, tol=None, backend="triton")
    r64 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None)
    r32 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None, dtype=torch.float32)
    assert_close(out.f.cpu(), r64.f, r32.f, dtype, "f")
    assert_close(out.g.cpu(), r64.g, r32.g, dtype, "g")
    Sg = S.cuda().requires_grad_()
    s = torch.tensor(12.0, device="cuda", requires_grad=True)
    loss = nk.ncl_loss(Sg, s, backend="triton")
    loss.backward()
    grads = []
    for ref_dtype in (torch.float64, torch.float32):
        leaf = S.to(torch.float64 if ref_dtype == torch.float64 else dtype).requires_grad_()
        sr = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
        value = ref.ncl_loss(leaf, sr, dtype=ref_dtype)
        value.backward()
        grads.append((value.detach(), leaf.grad, sr.grad))
    (l64, g64, s64), (l32, g32, s32) = grads
    assert_close(loss.detach().cpu(), l64, l32, dtype, "loss")
    assert_close(Sg.grad.cpu(), g64, g32, dtype, "dS")
    assert_close(s.grad.cpu(), s64, s32, dtype, "dscale")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1, 8), (67, 45, 40), (2053, 1031, 384),
                                   (700, 900, 1024)])
def test_gpu_embeddings(dtype, shape):
    n, m, d = shape
    x0, y0 = random_embeddings(n, m, d, dtype, seed=n)

    def run(fn, dev, **kw):
        exact = kw.get("dtype") == torch.float64
        x, y = (t.to(dev, torch.float64 if exact else dtype).requires_grad_() for t in (x0, y0))
        s = torch.tensor(15.0, device=dev, dtype=torch.float64 if "dtype" in kw else torch.float32,
                         requires_grad=True)
        loss = fn(x, y, s, **kw)
        loss.backward()
        return [t.detach().cpu() for t in (loss, x.grad, y.grad, s.grad)]

    ours = run(nk.ncl_loss_embeddings, "cuda", backend="triton")
    r64 = run(ref.ncl_loss_embeddings, "cpu", dtype=torch.float64)
    r32 = run(ref.ncl_loss_embeddings, "cpu", dtype=torch.float32)
    for name, a, b, c in zip(("loss", "dx", "dy", "dscale"), ours, r64, r32):
        assert_close(a, b, c, dtype, name)
    f = nk.sinkhorn_embeddings(x0.cuda(), y0.cuda(), 20.0, n_iters=10, tol=None,
                               backend="triton").f.cpu()
    f64 = ref.sinkhorn_embeddings(x0, y0, 20.0, n_iters=10, tol=None).f
    f32 = ref.sinkhorn_embeddings(x0, y0, 20.0, n_iters=10, tol=None, dtype=torch.float32).f
    assert_close(f, f64, f32, dtype, "f")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1031, 4099, 512), (4099, 1031, 130)])
def test_gpu_fused_step_grad_and_repeatability(dtype, shape, monkeypatch):
    n, m, d = shape
    x, y = (t.cuda() for t in random_embeddings(n, m, d, dtype, seed=d))
    be = install(monkeypatch)
    g = torch.randn(m, device="cuda")
    log_r = torch.zeros(n, device="cuda")
    f, lse_row, lse_col = be.sinkhorn_step_xy(x, y, 11.0, g, log_r)
    assert torch.equal(lse_row, be.row_lse_xy(x, y, 11.0, g))
    assert torch.equal(f, log_r - lse_row)
    assert rel_err(lse_col.cpu(), be.col_lse_xy(x, y, 11.0, f).cpu()) < 1e-6
    S64 = x.double().cpu() @ y.double().cpu().T
    S32 = x.float().cpu() @ y.float().cpu().T
    assert_close(lse_col.cpu(), ref.col_lse(S64, 11.0, f.cpu()),
                 ref.col_lse(S32, 11.0, f.cpu(), dtype=torch.float32), dtype, "lse_col")
    # the persistent grid's size does not change a row block's bits
    other = install(monkeypatch, programs=7)
    assert torch.equal(other.row_lse_xy(x, y, 11.0, g), lse_row)
    # the gradient: twice the same bits, and the split and single G within tolerance
    args = (f, g - 0.1, lse_row, lse_col, torch.full((n,), 0.5 / n, device="cuda"),
            torch.full((m,), 0.5 / m, device="cuda"), torch.arange(n, device="cuda") % m,
            torch.arange(m, device="cuda") % n)
    lse_r = be.row_lse_xy(x, y, 11.0, args[1])
    args = (args[0], args[1], lse_r) + args[3:]
    first = be.ncl_grad_xy(x, y, 11.0, *args)
    again = be.ncl_grad_xy(x, y, 11.0, *args)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    ref_be = get_backend("torch", torch.device("cuda"))
    want = ref_be.ncl_grad_xy(x, y, 11.0, *args)
    single = install(monkeypatch, grad_split=False).ncl_grad_xy(x, y, 11.0, *args)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for ours in (first, single):
        assert rel_err(ours[0].float().cpu(), want[0].float().cpu()) < tol
        assert rel_err(ours[1].float().cpu(), want[1].float().cpu()) < tol
        assert rel_err(ours[2].cpu(), want[2].cpu()) < 1e-4


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("d", [8, 130, 512, 1024])
def test_gpu_one_pair_loss_and_gradient_are_exactly_zero(dtype, d):
    # every pass forms the one logit with the same bits (the tensor cores' chain of
    # k-steps, in either orientation): the loss and its gradients cancel exactly
    x, y = (t.cuda().requires_grad_() for t in random_embeddings(1, 1, d, dtype, seed=d))
    s = torch.tensor(15.0, device="cuda", requires_grad=True)
    loss = nk.ncl_loss_embeddings(x, y, s, backend="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert (x.grad == 0).all() and (y.grad == 0).all() and float(s.grad) == 0.0


@pytest.mark.gpu
@needs_gpu
def test_gpu_bench_entry_points_smoke():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import triton_entry
    finally:
        sys.path.remove(str(ROOT / "bench"))
    for row in triton_entry.run(small=True):
        assert row["ok"], row
