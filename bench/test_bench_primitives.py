"""The primitive seam, one primitive at a time, on every usable backend of the device.

Dense primitives (N x N scores) are memory passes: their bytes are one read of S (LSE
passes) or one read and one write (gradient, bias application), against the read or copy
bandwidth roof. Streaming primitives (S = X @ Y.T never stored) are matmul work: 2 N M D
flops per product, against the dtype's matmul roof. Peers where a user has a one-liner:
``torch.logsumexp`` for the LSE passes, an in-place ``mul_``/``add_`` chain for the biases,
materializing ``x @ y.T`` for the streaming LSE.
"""

import pytest
import torch

import python_ref as ref
from ncl_kernels.backends import get

from harness import (
    DEVICE,
    DTYPES,
    ORACLE_MAX_ELEMS,
    SCALE,
    SIZE,
    STREAM_DTYPES,
    expect_close,
    ours_backends,
    run_case,
)

N = SIZE.dense
NS, D = SIZE.stream, SIZE.dim
ORACLE = N * N <= ORACLE_MAX_ELEMS
ORACLE_S = NS * NS <= ORACLE_MAX_ELEMS


def _scores(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(N, 64, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(N, 64, generator=gen), dim=1)
    return (x.to(DEVICE) @ y.to(DEVICE).T).to(dtype)


def _embeddings(dtype, n=None):
    n = n or NS
    gen = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1)
    return x.to(dtype).to(DEVICE), y.to(dtype).to(DEVICE)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d)[6:])
def dense(request):
    dtype = request.param
    S = _scores(dtype)
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(N, generator=gen).to(_acc(dtype)).to(DEVICE)
    g = torch.randn(N, generator=gen).to(_acc(dtype)).to(DEVICE)
    return dtype, S, f, g


@pytest.fixture(scope="module", params=STREAM_DTYPES, ids=lambda d: str(d)[6:])
def stream(request):
    dtype = request.param
    x, y = _embeddings(dtype)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(NS, generator=gen).to(_acc(dtype)).to(DEVICE)
    return dtype, x, y, g


def _lse_ref(S, g, dim):
    """The oracle's LSE, or torch.logsumexp in float32 beyond its size."""
    if ORACLE:
        return (ref.row_lse(S, SCALE, g) if dim == 1 else ref.col_lse(S, SCALE, g)), True
    bias = g if dim == 1 else g[:, None]
    return torch.logsumexp(SCALE * S.float() + bias, dim), False


# -- dense LSE passes ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ours_backends() + ["eager"])
@pytest.mark.parametrize("op", ["row_lse", "col_lse"])
def test_lse_pass(benchmark, roofs, dense, op, impl):
    dtype, S, f, g = dense
    bias = g if op == "row_lse" else f
    dim = 1 if op == "row_lse" else 0
    if impl == "eager":
        b = bias if dim == 1 else bias[:, None]
        fn = lambda: torch.logsumexp(SCALE * S.to(b.dtype) + b, dim)
    else:
        fn = lambda: getattr(get(impl, DEVICE), op)(S, SCALE, bias)
    expected, oracle = _lse_ref(S, bias, dim)
    run_case(benchmark, roofs, op=op, backend=impl, ours=impl != "eager", fn=fn,
             check=lambda out: expect_close(op, out, expected, dtype, oracle),
             shape=S.shape, dtype=dtype, bytes_moved=S.numel() * S.element_size(),
             roof="read", exps=S.numel())


# -- dense gradient pass and bias application -------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
@pytest.mark.parametrize("impl", ours_backends())
def test_ncl_grad(benchmark, roofs, dense, impl, inplace):
    dtype, S, f, g = dense
    be = get(impl, DEVICE)
    acc = _acc(dtype)
    lse_row, lse_col = be.row_lse(S, SCALE, g), be.col_lse(S, SCALE, f)
    coef = torch.full((N,), 0.5 / N, dtype=acc, device=DEVICE)
    idx = torch.arange(N, device=DEVICE)
    state = {}

    def setup():
        state["out"] = S.clone() if inplace else torch.empty_like(S)

    def fn():
        S_in = state["out"] if inplace else S
        ds = be.ncl_grad_(S_in, SCALE, f, g, lse_row, lse_col, coef, coef, idx, idx,
                          out=state["out"])
        return state["out"], ds

    def check(out):
        grad, ds = out
        if ORACLE:
            G = ref.ncl_grad(S, SCALE, f, g)
            exp_grad, exp_ds, oracle = SCALE * G, (G * S.double()).sum(), True
        else:
            G = _grad_f32(S, f, g, lse_row, lse_col)
            exp_grad, exp_ds, oracle = SCALE * G, (G * S.float()).sum(), False
        return (expect_close("dS", grad, exp_grad, dtype, oracle) + "; "
                + expect_close("ds", ds, exp_ds, dtype, oracle))

    run_case(benchmark, roofs, op="ncl_grad_inplace" if inplace else "ncl_grad",
             backend=impl, fn=fn, check=check, setup=setup, shape=S.shape, dtype=dtype,
             bytes_moved=2 * S.numel() * S.element_size(), roof="copy", exps=2 * S.numel())


def _grad_f32(S, f, g, lse_row, lse_col):
    """docs/math.md section 3's G in float32 (diagonal targets, weights 1/2), beyond the oracle."""
    L = SCALE * S.float()
    n = S.shape[0]
    G = 0.5 / n * (torch.exp(L + g - lse_row[:, None]) + torch.exp(L + f[:, None] - lse_col))
    G.diagonal().sub_(1.0 / n)
    return G


def _grad_xy_f32(x, y, f, g, lse_row, lse_col, rows=4096):
    """``(s G Y, s G^T X, sum G S)`` in float32 over chunks of rows, beyond the oracle.

    The LSE vectors are inputs of the primitive, so using them here is fair; the chunks
    keep the check's memory at ``rows x M`` where a whole G would not fit.
    """
    X, Y = x.float(), y.float()
    dX, dY = torch.empty_like(X), torch.zeros_like(Y)
    ds = torch.zeros((), device=X.device)
    n = X.shape[0]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        S = X[start:stop] @ Y.T
        L = SCALE * S
        G = 0.5 / n * (torch.exp(L + g - lse_row[start:stop, None])
                       + torch.exp(L + f[start:stop, None] - lse_col))
        G.diagonal(offset=start).sub_(1.0 / n)
        dX[start:stop] = SCALE * G @ Y
        dY += SCALE * G.T @ X[start:stop]
        ds += (G * S).sum()
    return dX, dY, ds


@pytest.mark.parametrize("impl", ours_backends() + ["eager"])
def test_apply_biases(benchmark, roofs, dense, impl):
    dtype, S, f, g = dense
    state = {}
    be = None if impl == "eager" else get(impl, DEVICE)

    def setup():
        state["S"] = S.clone()

    def fn():
        T = state["S"]
        if be is None:  # what a user writes: three in-place passes
            return T.mul_(SCALE).add_(f[:, None].to(T.dtype)).add_(g.to(T.dtype))
        return be.apply_biases_(T, SCALE, f, g)

    expected = ref.apply_biases(S, SCALE, f, g) if ORACLE else \
        (SCALE * S.float() + f[:, None] + g)
    run_case(benchmark, roofs, op="apply_biases_", backend=impl, ours=be is not None, fn=fn,
             setup=setup,
             check=lambda out: expect_close("S", out, expected, dtype, ORACLE),
             shape=S.shape, dtype=dtype, bytes_moved=2 * S.numel() * S.element_size(),
             roof="copy")


# -- streaming primitives ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ours_backends() + ["eager"])
@pytest.mark.parametrize("op", ["row_lse_xy", "col_lse_xy"])
def test_lse_xy(benchmark, roofs, stream, op, impl):
    dtype, x, y, g = stream
    if impl == "eager":
        if op == "row_lse_xy":
            fn = lambda: torch.logsumexp(SCALE * (x.float() @ y.float().T) + g, 1)
        else:
            fn = lambda: torch.logsumexp(SCALE * (x.float() @ y.float().T) + g[:, None], 0)
    else:
        fn = lambda: getattr(get(impl, DEVICE), op)(x, y, SCALE, g)
    if ORACLE_S:
        S64 = x.double() @ y.double().T
        expected = ref.row_lse(S64, SCALE, g) if op == "row_lse_xy" else \
            ref.col_lse(S64, SCALE, g)
        del S64
    else:
        S32 = x.float() @ y.float().T
        expected = torch.logsumexp(SCALE * S32 + (g if op == "row_lse_xy" else g[:, None]),
                                   1 if op == "row_lse_xy" else 0)
        del S32
    run_case(benchmark, roofs, op=op, backend=impl, ours=impl != "eager", fn=fn,
             check=lambda out: expect_close(op, out, expected, dtype, ORACLE_S),
             shape=(NS, NS, D), dtype=dtype, flops=2.0 * NS * NS * D, roof="matmul")


@pytest.mark.parametrize("impl", ours_backends())
def test_ncl_grad_xy(benchmark, roofs, stream, impl):
    """Backward of the streaming loss: recompute S, then dX = s G Y and dY = s G^T X."""
    dtype, x, y, g = stream
    be = get(impl, DEVICE)
    acc = _acc(dtype)
    f = -be.row_lse_xy(x, y, SCALE, g)
    lse_row, lse_col = be.row_lse_xy(x, y, SCALE, g), be.col_lse_xy(x, y, SCALE, f)
    coef = torch.full((NS,), 0.5 / NS, dtype=acc, device=DEVICE)
    idx = torch.arange(NS, device=DEVICE)
    fn = lambda: be.ncl_grad_xy(x, y, SCALE, f, g, lse_row, lse_col, coef, coef, idx, idx)

    def check(out):
        dX, dY, ds = out
        if ORACLE_S:
            S = x.double() @ y.double().T
            G = ref.ncl_grad(S, SCALE, f, g)
            X, Y = x.double(), y.double()
            want = (SCALE * G @ Y, SCALE * G.T @ X, (G * S).sum())
            del S, G
        else:
            want = _grad_xy_f32(x, y, f, g, lse_row, lse_col)
        return "; ".join(expect_close(name, a, b, dtype, ORACLE_S)
                         for name, a, b in zip(("dX", "dY", "ds"), (dX, dY, ds), want))

    run_case(benchmark, roofs, op="ncl_grad_xy", backend=impl, fn=fn, check=check,
             shape=(NS, NS, D), dtype=dtype, flops=3 * 2.0 * NS * NS * D, roof="matmul")
