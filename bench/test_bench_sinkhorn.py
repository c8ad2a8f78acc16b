"""Sinkhorn end to end: dense (``sinkhorn``) and streaming (``sinkhorn_embeddings``).

A fixed number of iterations (``tol=None``: no host synchronization per iteration), the
same for every implementation, all starting from ``g = 0`` with the row update first, so
potentials compare entry by entry. Work counted: dense, 2 reads of S per iteration (one
row and one column pass; GB/s against the read roof); streaming, 2 products of
``2 N M D`` flops per iteration (TFLOP/s against the matmul roof).

Peers: the eager two-``logsumexp`` loop, ``torch.compile`` of it, POT ``sinkhorn_log``
(dense; CPU float32 through POT's torch backend), pykeops LazyTensor ``logsumexp``
(streaming) and flash-sinkhorn (streaming, CUDA only).
"""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref

import peers
from harness import (
    DEVICE,
    DTYPES,
    ON_GPU,
    ORACLE_MAX_ELEMS,
    SCALE,
    SIZE,
    STREAM_DTYPES,
    cosine_scores,
    expect_close,
    ours_backends,
    run_case,
    split_impl,
    unit_rows,
    with_streaming,
)

N = SIZE.dense
NS, D = SIZE.stream, SIZE.dim
ITERS = 10
ORACLE = N * N <= ORACLE_MAX_ELEMS
ORACLE_S = NS * NS <= ORACLE_MAX_ELEMS
DENSE_PEERS = ["eager", "compile", "pot"]
STREAM_PEERS = ["eager", "compile", "keops", "flash-sinkhorn"]


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d)[6:])
def dense(request):
    dtype = request.param
    S = cosine_scores(N, dtype)
    if ORACLE:
        expected = ref.sinkhorn(S, SCALE, n_iters=ITERS, tol=None)
    else:
        expected = peers.sinkhorn_eager(S, SCALE, ITERS)
    return dtype, S, expected


@pytest.fixture(scope="module", params=STREAM_DTYPES, ids=lambda d: str(d)[6:])
def stream(request):
    dtype = request.param
    x, y = unit_rows(NS, D, 2, dtype).to(DEVICE), unit_rows(NS, D, 3, dtype).to(DEVICE)
    if ORACLE_S:
        expected = ref.sinkhorn_embeddings(x, y, SCALE, n_iters=ITERS, tol=None)
    else:
        expected = peers.sinkhorn_embeddings_eager(x, y, SCALE, ITERS)
    return dtype, x, y, expected


def _fg(expected):
    return (expected.f, expected.g) if hasattr(expected, "f") else expected


def _check_fg(out, expected, dtype, oracle):
    f, g = out
    ef, eg = _fg(expected)
    return expect_close("f", f, ef, dtype, oracle) + "; " + expect_close("g", g, eg, dtype,
                                                                          oracle)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("impl", ours_backends(auto=True) + DENSE_PEERS)
def test_sinkhorn_dense(benchmark, roofs, dense, impl):
    dtype, S, expected = dense
    check = lambda out: _check_fg(out, expected, dtype, ORACLE)
    if impl == "eager":
        fn = lambda: peers.sinkhorn_eager(S, SCALE, ITERS)
    elif impl == "compile":
        fn = lambda: peers.sinkhorn_compiled(S, SCALE, ITERS)
        fn()  # compile outside the timing
    elif impl == "pot":
        pytest.importorskip("ot", reason="POT is not installed (pip install pot)")
        fn = lambda: peers.sinkhorn_pot(S, SCALE, ITERS)
        # POT's (log_u, log_v) follow our iteration on S.T with the masses swapped
        if ORACLE:
            M = S.shape[1]
            expected_t = ref.sinkhorn(S.T, SCALE, n_iters=ITERS, tol=None,
                                      row_mass=torch.full((M,), N / M, dtype=torch.float64,
                                                          device=DEVICE),
                                      col_mass=torch.ones(N, dtype=torch.float64,
                                                          device=DEVICE))
            exp_u, exp_v = expected_t.g, expected_t.f
        else:
            exp_v, exp_u = peers.sinkhorn_eager(S.T, SCALE, ITERS)
        check = lambda out: (expect_close("log_u", out[0], exp_u, dtype, ORACLE) + "; "
                             + expect_close("log_v", out[1], exp_v, dtype, ORACLE))
    else:
        def fn():
            res = nk.sinkhorn(S, SCALE, n_iters=ITERS, tol=None, backend=impl)
            return res.f, res.g
    run_case(benchmark, roofs, op="sinkhorn", backend=impl, ours=impl not in DENSE_PEERS,
             fn=fn, check=check, shape=S.shape, dtype=dtype,
             bytes_moved=2 * ITERS * S.numel() * S.element_size(), roof="read",
             exps=2 * ITERS * S.numel(), note=f"{ITERS} iterations, tol=None")


@pytest.mark.parametrize("impl", with_streaming(ours_backends(auto=True)) + STREAM_PEERS)
def test_sinkhorn_embeddings(benchmark, roofs, stream, impl):
    dtype, x, y, expected = stream
    check = lambda out: _check_fg(out, expected, dtype, ORACLE_S)
    if impl == "eager":
        fn = lambda: peers.sinkhorn_embeddings_eager(x, y, SCALE, ITERS)
    elif impl == "compile":
        compiled = torch.compile(peers.sinkhorn_embeddings_eager, dynamic=False)
        fn = lambda: compiled(x, y, SCALE, ITERS)
        fn()  # compile outside the timing
    elif impl == "keops":
        keops = _keops_or_skip(x, y)
        fn = lambda: keops(ITERS)
    elif impl == "flash-sinkhorn":
        fn, check = _flash_sinkhorn_case(x, y, expected, dtype)
    else:
        backend, materialize = split_impl(impl)

        def fn():
            res = nk.sinkhorn_embeddings(x, y, SCALE, n_iters=ITERS, tol=None,
                                         backend=backend, materialize=materialize)
            return res.f, res.g
    run_case(benchmark, roofs, op="sinkhorn_embeddings", backend=impl,
             ours=impl not in STREAM_PEERS, fn=fn, check=check, shape=(NS, NS, D),
             dtype=dtype, flops=2 * ITERS * 2.0 * NS * NS * D, roof="matmul",
             note=f"{ITERS} iterations, tol=None")


def _keops_or_skip(x, y):
    try:
        keops = peers.KeOpsSinkhorn(x, y, SCALE)
        keops(1)  # the first call compiles the formulas with the host compiler
    except ImportError as exc:
        pytest.skip(f"pykeops is not installed: {exc}")
    except Exception as exc:  # noqa: BLE001 (a KeOps build or CUDA setup problem, not ours)
        pytest.skip(f"pykeops could not build its formulas here: {type(exc).__name__}: "
                    f"{str(exc)[:200]}")
    return keops


def _flash_sinkhorn_case(x, y, expected, dtype):
    """flash-sinkhorn's alternating (Gauss-Seidel) solver on the same transport problem.

    Its cost is ``C_ij = |x_i|^2 + |y_j|^2 - 2 <x_i, y_j>`` and with ``eps = 2 / scale``
    its logits ``-C / eps`` are ours plus a row and a column term. With probability
    weights ``a = r / N``, ``b = c / N`` and its OTT convention (``P = exp((f + g - C) /
    eps)``) its iterates map onto ours exactly (substitute into one row and one column
    update): ``f_ours = (f - |x|^2) / eps + log N - 1 / eps`` and ``g_ours = (g - |y|^2) /
    eps + 1 / eps``. It starts from ``g = 0``, i.e. ours from ``init_g = (1 - |y|^2) / eps``
    (zero for exactly unit vectors, not quite after bfloat16 rounding), row update first,
    so the check compares with ours (backend ``torch``, itself checked against the oracle
    in its own case) from that start. TF32 off, as in ours. Read from flash-sinkhorn
    0.4.1's source (``sinkhorn_solvers.sinkhorn_flashstyle_alternating``); not yet run on
    a GPU by this project.
    """
    import math

    if not ON_GPU:
        pytest.skip("flash-sinkhorn runs on CUDA only (Triton kernels)")
    try:
        from flash_sinkhorn.sinkhorn_solvers import sinkhorn_flashstyle_alternating
    except ImportError as exc:
        pytest.skip(f"flash-sinkhorn is not installed (pip install flash-sinkhorn): {exc}")
    eps = 2.0 / SCALE
    n, m = x.shape[0], y.shape[0]
    xf, yf = x.float(), y.float()
    x2, y2 = (xf * xf).sum(1), (yf * yf).sum(1)
    a = torch.full((n,), 1.0 / n, device=x.device)
    b = torch.full((m,), 1.0 / m, device=x.device)  # c / N = (N / M) / N
    start = nk.sinkhorn_embeddings(x, y, SCALE, n_iters=ITERS, tol=None,
                                   init_g=(1.0 - y2) / eps, backend="torch")

    def fn():
        f, g = sinkhorn_flashstyle_alternating(xf, yf, a, b, eps=eps, n_iters=ITERS,
                                               allow_tf32=False, ott_convention=True)
        return ((f - x2) / eps + (math.log(n) - 1.0 / eps),
                (g - y2) / eps + 1.0 / eps)

    def check(out):
        return _check_fg(out, (start.f, start.g), dtype, False).replace("peer", "ours")

    return fn, check
