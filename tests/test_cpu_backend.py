"""The C++ CPU backend's dense primitives against the float64 oracle, on every kernel set.

Each test runs with every instruction set this build has and this CPU runs (AVX-512, AVX2,
portable), so the portable kernels are checked even on a machine that would never pick
them. The public entry points (sinkhorn, ncl_loss, ...) are covered on this backend by the
``backend`` fixture of the other test files.
"""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref

from conftest import STORAGE_DTYPES, assert_close, random_scores

if not nk.backends()["cpu"]["usable"]:
    pytest.skip("the C++ CPU module is not built", allow_module_level=True)

from ncl_kernels import _C_cpu
from ncl_kernels.backends.cpu import CpuBackend

NEG_INF = float("-inf")
SHAPES = [(1, 1), (1, 1031), (7, 67), (67, 7), (1031, 67), (67, 1031)]
ISAS = _C_cpu.available_isas().split(",")


@pytest.fixture(params=ISAS)
def be(request):
    before = _C_cpu.isa()
    _C_cpu.set_isa(request.param)
    try:
        yield CpuBackend()
    finally:
        _C_cpu.set_isa(before)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked(S, seed):
    """S with about 10% of entries, one whole row and one whole column set to -inf."""
    gen = torch.Generator().manual_seed(seed)
    S = S.clone()
    S[torch.rand(S.shape, generator=gen) < 0.1] = NEG_INF
    if S.shape[0] > 2 and S.shape[1] > 2:
        S[1, :] = NEG_INF
        S[:, 2] = NEG_INF
    return S


def potentials(n, m, dtype, seed, with_neg_inf=True):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, generator=gen, dtype=torch.float64).to(acc_of(dtype))
    g = torch.randn(m, generator=gen, dtype=torch.float64).to(acc_of(dtype))
    if with_neg_inf and n > 3 and m > 3:  # zero-mass rows/columns
        f[3] = NEG_INF
        g[0] = NEG_INF
    return f, g


def _ref_both(fn, *args, **kw):
    return fn(*args, **kw, dtype=torch.float64), fn(*args, **kw, dtype=torch.float32)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_row_and_col_lse_match_oracle(be, dtype, shape, strided):
    S = masked(random_scores(*shape, dtype, seed=sum(shape), strided=strided, scale=2.0), 1)
    f, g = potentials(*shape, dtype, seed=2)
    before = S.clone()
    for ours, (r64, r32) in [
        (be.row_lse(S, 7.0, g), _ref_both(ref.row_lse, S, 7.0, g)),
        (be.row_lse(S, 7.0), _ref_both(ref.row_lse, S, 7.0)),
        (be.col_lse(S, 7.0, f), _ref_both(ref.col_lse, S, 7.0, f)),
        (be.col_lse(S, 7.0), _ref_both(ref.col_lse, S, 7.0)),
    ]:
        assert ours.dtype == acc_of(dtype)
        assert_close(ours, r64, r32, dtype, f"lse {shape}")
    assert torch.equal(S, before)


def test_lse_extreme_logits_and_all_masked(be):
    S = torch.tensor([[1000.0, -1000.0, 0.0], [NEG_INF, NEG_INF, NEG_INF], [-1e4, -1e4, NEG_INF]])
    expect_row = torch.logsumexp(S.double(), 1)
    expect_col = torch.logsumexp(S.double(), 0)
    torch.testing.assert_close(be.row_lse(S, 1.0).double(), expect_row, rtol=1e-6, atol=0)
    torch.testing.assert_close(be.col_lse(S, 1.0).double(), expect_col, rtol=1e-6, atol=0)
    assert be.row_lse(S, 1.0)[1] == NEG_INF
    # no rows / no columns: every LSE is over nothing
    assert torch.equal(be.col_lse(torch.empty(0, 4), 1.0), torch.full((4,), NEG_INF))
    assert torch.equal(be.row_lse(torch.empty(3, 0), 1.0), torch.full((3,), NEG_INF))


def test_nan_input_gives_nan_not_minus_inf(be):
    # NaN is rejected by the public API; the kernels still must not hide it
    S = torch.zeros(5, 40)
    S[2, 7] = float("nan")
    S[4, :] = NEG_INF
    S[4, 3] = float("nan")
    assert torch.isnan(be.row_lse(S, 1.0)[[2, 4]]).all()
    assert torch.isnan(be.col_lse(S, 1.0)[[3, 7]]).all()
    assert not torch.isnan(be.row_lse(S, 1.0)[[0, 1, 3]]).any()


def _grad_case(shape, dtype, seed, strided=False):
    n, m = shape
    S = masked(random_scores(n, m, dtype, seed=seed, strided=strided, scale=2.0), seed)
    f, g = potentials(n, m, dtype, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, m, (n,), generator=gen)
    z = torch.randint(0, n, (m,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.3] = -1
    z[torch.rand(m, generator=gen) < 0.3] = -1
    if n > 1:
        y[0] = -1
    return S, f, g, y, z


def _coefs(y, z, weights, acc):
    has_y, has_z = (y >= 0).to(acc), (z >= 0).to(acc)
    return (has_y * weights[0] / has_y.sum().clamp(min=1),
            has_z * weights[1] / has_z.sum().clamp(min=1))


def _grad_args(be, S, scale, f, g, y, z, weights=(0.3, 0.7)):
    acc = acc_of(S.dtype)
    lse_row, lse_col = be.row_lse(S, scale, g), be.col_lse(S, scale, f)
    cr, cc = _coefs(y, z, weights, acc)
    return (S, scale, f, g, lse_row, lse_col, cr, cc, y, z)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ncl_grad_matches_oracle_new_buffer_and_in_place(be, dtype, shape):
    S, f, g, y, z = _grad_case(shape, dtype, seed=shape[0] + 3 * shape[1], strided=True)
    scale = 6.0
    args = _grad_args(be, S, scale, f, g, y, z)
    G64, G32 = _ref_both(ref.ncl_grad, S, scale, f, g, y, z, (0.3, 0.7))
    ds64 = (G64 * S.double()).nan_to_num(nan=0.0, neginf=0.0, posinf=0.0).sum()
    ds32 = (G32 * S.float()).nan_to_num(nan=0.0, neginf=0.0, posinf=0.0).sum()

    before = S.clone()
    out = torch.empty(S.shape, dtype=dtype)
    ds = be.ncl_grad_(*args, out=out)
    assert torch.equal(S, before), "out=new buffer must not write S"
    assert ds.dtype == acc_of(dtype)
    # scale * G is stored in S's dtype: the float32 reference gets the same final rounding
    G32_stored = (G32 * scale).to(dtype).double() / scale
    assert_close(out.double() / scale, G64, G32_stored, dtype, "G")
    assert_close(ds.reshape(1), ds64.reshape(1), ds32.reshape(1), dtype, "dscale")

    ds_only = be.ncl_grad_(*args, out=None)
    assert torch.equal(S, before) and float(ds_only) == float(ds)

    work = S.clone()  # in place on a clone: every element read before it is written
    ds_inplace = be.ncl_grad_(work, *args[1:], out=work)
    assert float(ds_inplace) == float(ds)
    assert torch.equal(work, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ncl_grad_chunks_with_row_offset_equal_whole(be, dtype):
    S, f, g, y, z = _grad_case((67, 45), dtype, seed=11)
    args = _grad_args(be, S, 3.0, f, g, y, z)
    whole = torch.empty_like(S)
    ds_whole = be.ncl_grad_(*args, out=whole)
    parts, ds_parts = torch.empty_like(S), 0.0
    S_, s_, f_, g_, lr, lc, cr, cc, y_, z_ = args
    for start, stop in [(0, 1), (1, 30), (30, 67)]:
        ds_parts += float(be.ncl_grad_(S_[start:stop], s_, f_[start:stop], g_, lr[start:stop], lc,
                                       cr[start:stop], cc, y_[start:stop], z_,
                                       out=parts[start:stop], row_offset=start))
    assert torch.equal(parts, whole)
    assert ds_parts == pytest.approx(float(ds_whole), rel=1e-6)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 67), (1031, 67)])
def test_apply_biases_rounds_once_like_torch(be, dtype, shape):
    S = masked(random_scores(*shape, dtype, seed=5, strided=True), 5)
    f, g = potentials(*shape, dtype, seed=6)
    acc = acc_of(dtype)
    for ff, gg in [(f, g), (None, g), (f, None), (None, None)]:
        expect = S.to(acc) * 3.0
        if ff is not None:
            expect = expect + ff[:, None]
        if gg is not None:
            expect = expect + gg
        work = S.clone()
        assert be.apply_biases_(work, 3.0, ff, gg) is work
        # same float32 operations in the same order, rounded once: bitwise equal
        assert torch.equal(work, expect.to(dtype))
        r64 = ref.apply_biases(S, 3.0, ff, gg)
        keep = torch.isfinite(r64)
        assert torch.equal(torch.isneginf(work), torch.isneginf(r64))
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(work.double()[keep], r64[keep], rtol=tol, atol=tol)


def test_low_precision_stores_round_to_nearest_even(be):
    # apply_biases with scale 1 and no potentials writes float32 values rounded once:
    # every float32 bit pattern class (ties, subnormals, overflow) must round like torch
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (1, 1 << 16), generator=gen, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    ties = torch.tensor([[1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5, 65520.0, 65519.0, -0.0]])
    x = torch.cat([x, ties.float()], 1)
    for dtype in (torch.float16, torch.bfloat16):
        # the kernel reads storage of `dtype`; feed it values that round-trip, then scale by
        # a power of two so the result needs rounding exactly like x.to(dtype) does
        S = (x / 2.0**8).to(dtype) if dtype == torch.bfloat16 else x.clamp(-6e4, 6e4).to(dtype)
        work = S.clone()
        be.apply_biases_(work, 1.0 + 2**-9, None, None)
        expect = (S.float() * (1.0 + 2**-9)).to(dtype)
        assert torch.equal(work.view(torch.int16), expect.view(torch.int16))


PRIMS = ["row", "col", "grad", "apply"]


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_results_bitwise_equal_for_1_and_2_threads(be, dtype):
    S, f, g, y, z = _grad_case((1031, 600), dtype, seed=9, strided=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            args = _grad_args(be, S, 5.0, f, g, y, z)
            out = torch.empty_like(S)
            ds = be.ncl_grad_(*args, out=out)
            applied = be.apply_biases_(S.clone(), 5.0, f, g)
            results.append([args[4], args[5], out, ds, applied])
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(["row_lse", "col_lse", "grad", "dscale", "apply_biases"], *results):
        assert torch.equal(a, b), name


def test_isa_control_and_build_info():
    info = _C_cpu.build_info()
    assert info["isa"] in ISAS and "generic" in ISAS
    assert info["available_isas"].split(",") == ISAS
    with pytest.raises(ValueError, match="unknown instruction set"):
        _C_cpu.set_isa("sse9")


def test_auto_picks_cpu_for_cpu_tensors():
    from ncl_kernels.backends import get
    routes = get("auto", torch.device("cpu")).routes
    assert {r["float"] for r in routes.values()} == {r["float64"] for r in routes.values()} \
        == {"cpu"}


def test_inplace_backward_hands_S_storage_to_autograd():
    # the caller's tensor becomes the gradient: no N x M buffer is allocated or copied
    S0 = random_scores(67, 45, torch.float32, seed=4)
    S = S0.clone().requires_grad_()
    nk.ncl_loss(S, 5.0, inplace_backward=True, backend="cpu").backward()
    assert S.grad.data_ptr() == S.data_ptr()
    expect = S0.clone().requires_grad_()
    nk.ncl_loss(expect, 5.0, backend="cpu").backward()
    assert torch.equal(S.grad, expect.grad)
    assert not torch.equal(S.detach(), S0)  # overwritten, as documented


@pytest.mark.parametrize("n", [1, 3, 37, 1000])
def test_lse_of_a_count_cancels_torch_log_exactly(be, n):
    # Equal logits make the LSE's sum a count, log(n); the backend finishes the kernel's
    # (max, sum) with torch.log, the log the Sinkhorn driver takes of the masses, so that
    # log(c) - LSE is exactly 0 where it should be (a single column: c = n) instead of
    # one ulp off between two libms.
    S = random_scores(n, 1, torch.float32, seed=n)
    f = -3.0 * S[:, 0]  # scale * S + f = 0 exactly
    log_c = torch.log(torch.tensor([float(n)]))
    assert torch.equal(be.col_lse(S, 3.0, f) - log_c, torch.zeros(1))
    assert torch.equal(be.row_lse(S.T.contiguous(), 3.0, f) - log_c, torch.zeros(1))
