"""One Sinkhorn iteration (a row and a column pass) on an N x N float32 matrix.

Ours (every usable CPU backend) against what a user would write instead: the eager
two-``logsumexp`` loop and POT's ``sinkhorn_log``. Each case is checked against the
float64 oracle before it is timed. Floor: two reads of S at the measured read bandwidth.
"""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from conftest import DENSE_N, record

N = DENSE_N
SCALE = 10.0


@pytest.fixture(scope="module")
def scores():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, 64, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(N, 64, generator=gen), dim=1)
    return x @ y.T


@pytest.fixture(scope="module")
def expected(scores):
    return ref.sinkhorn(scores, SCALE, n_iters=1, tol=None)


def eager_iteration(S, scale):
    """The obvious PyTorch loop: f = log r - LSE_row(g), g = log c - LSE_col(f)."""
    L = scale * S
    g = torch.zeros(S.shape[1])
    f = -torch.logsumexp(L + g, 1)
    g = torch.log(torch.tensor(S.shape[0] / S.shape[1])) - torch.logsumexp(L + f[:, None], 0)
    return f, g


def _check(f, g, expected):
    assert (f.double() - expected.f).abs().max() < 1e-4
    assert (g.double() - expected.g).abs().max() < 1e-4


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if nk.backends()[b]["usable"]])
def test_ncl_kernels(benchmark, scores, expected, read_bandwidth, backend):
    run = lambda: nk.sinkhorn(scores, SCALE, n_iters=1, tol=None, backend=backend)  # noqa: E731
    out = run()
    _check(out.f, out.g, expected)
    benchmark(run)
    # one iteration = 1 start row pass + 1 column pass + 1 closing row pass (the closing
    # pass also serves the next iteration, so the steady state is 2 passes)
    record(benchmark, bytes_moved=3 * scores.numel() * 4, roof=read_bandwidth, shape=[N, N])


def test_eager_logsumexp(benchmark, scores, expected, read_bandwidth):
    f, g = eager_iteration(scores, SCALE)
    _check(f, g, expected)
    benchmark(eager_iteration, scores, SCALE)
    record(benchmark, bytes_moved=2 * scores.numel() * 4, roof=read_bandwidth, shape=[N, N])


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_pot_sinkhorn_log(benchmark, scores, expected, read_bandwidth):
    ot = pytest.importorskip("ot")
    a = torch.ones(N, dtype=torch.float64)
    b = torch.ones(N, dtype=torch.float64)
    cost = -scores.double()

    def run():
        return ot.sinkhorn(a, b, cost, 1.0 / SCALE, method="sinkhorn_log", numItermax=1,
                           stopThr=0.0, log=True)[1]

    log = run()
    # POT updates the column potential first and the row one last, so after its
    # iteration the rows are exact: check that coupling rather than the potentials.
    P = torch.exp((log["log_u"][:, None] + log["log_v"][None, :]) - cost * SCALE)
    assert torch.allclose(P.sum(1), a, atol=1e-6)
    benchmark(run)
    record(benchmark, bytes_moved=2 * scores.numel() * 4, roof=read_bandwidth, shape=[N, N])


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if nk.backends()[b]["usable"]])
def test_row_pass_primitive(benchmark, scores, read_bandwidth, backend):
    """The row LSE primitive alone: one read of S."""
    from ncl_kernels.backends import get
    be = get(backend, scores.device)
    g = torch.randn(N)
    out = be.row_lse(scores, SCALE, g)
    torch.testing.assert_close(out.double(), ref.row_lse(scores, SCALE, g), rtol=1e-6, atol=0)
    benchmark(be.row_lse, scores, SCALE, g)
    record(benchmark, bytes_moved=scores.numel() * 4, roof=read_bandwidth, shape=[N, N])
