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


@pytest.fixture
def be():
    """The backend object itself, for the primitive-level tests."""
    if not INTERP:
        pytest.skip(_LANE)
    return get_backend("triton", torch.device("cpu"))


@pytest.fixture(params=[None, 16], ids=["default-blocks", "blocks16"])
def blocks(request, monkeypatch):
    """Default launch blocks, and every block capped at 16: many masked tiles."""
    from ncl_kernels.backends.triton.backend import TritonBackend
    monkeypatch.setattr(TritonBackend, "block_cap", request.param)


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


def _sm90_cases():
    """(kernel, pointer types, constexprs, num_warps, num_stages) as the launchers use them."""
    from ncl_kernels.backends.triton import dense, streaming
    cases = []
    for dt in ("bf16", "fp16", "fp32"):
        p = "*" + dt
        vec = {k: "*fp32" for k in ("F", "Gp", "G", "LSE_R", "LSE_C", "CR", "CC", "DS", "OUT")}
        vec.update({"Y": "*i64", "Z": "*i64", "YT": "*i64", "ZT": "*i64", "S": p, "X": p,
                    "Yp": p, "DX": p, "DY": p})
        if dt != "fp32":
            vec["OUT"] = "*fp32"
        cases += [
            (dense.row_lse_kernel, vec, {"HAS_G": True, "BLOCK_N": 4, "BLOCK_M": 1024}, 8, 3),
            (dense.col_lse_kernel, vec, {"HAS_F": True, "BLOCK_N": 32, "BLOCK_M": 128}, 4, 3),
            (dense.ncl_grad_kernel, dict(vec, OUT=p),
             {"WRITE": True, "BLOCK_N": 32, "BLOCK_M": 128}, 4, 3),
            (dense.apply_biases_kernel, vec,
             {"HAS_F": True, "HAS_G": True, "BLOCK_N": 32, "BLOCK_M": 128}, 4, 3),
        ]
        wide = dt == "fp32"
        tile = {"PRECISION": "ieee", "UPCAST": False, "BLOCK_M": 64, "BLOCK_D": 32 if wide else 64}
        cases.append((streaming.row_lse_xy_kernel, vec,
                       dict(tile, HAS_G=True, BLOCK_N=64 if wide else 128), 4 if wide else 8, 3))
        grad = dict(tile, GRAD_PRECISION="ieee", BLOCK_N=64, BLOCK_DO=128)
        cases.append((streaming.grad_dx_kernel, vec, dict(grad, WRITE=True), 8, 2))
        cases.append((streaming.grad_dy_kernel, vec, grad, 8, 2))
    return cases


@pytest.mark.skipif(INTERP, reason="needs the compiled (not interpreted) kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter lane runs the kernels' arithmetic but not Triton's compiler: this
    # lowers every kernel (every storage dtype, the launchers' block sizes) to an sm_90
    # cubin with the ptxas Triton ships, so a kernel that only the GPU compiler rejects
    # fails here, on CPU.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", 90, 32)
    for fn, ptrs, consts, warps, stages in _sm90_cases():
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "scale" else "i32")
               for n in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                target=target, options={"num_warps": warps,
                                                        "num_stages": stages,
                                                        "enable_fp_fusion": False})
        assert kernel.asm["cubin"], fn.__name__


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


def test_dot_precision_is_checked(be, monkeypatch):
    from ncl_kernels.backends import registry
    kernels = registry.instance("triton")
    monkeypatch.setattr(type(kernels), "dot_precision", "fast")
    x, y = random_embeddings(5, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="dot_precision"):
        be.row_lse_xy(x, y, 1.0)


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
def test_gpu_bench_entry_points_smoke():
    from ncl_kernels.backends.triton import bench
    for row in bench.run(small=True):
        assert row["ok"], row
