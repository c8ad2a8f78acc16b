"""The custom ops: opcheck on CPU, and torch.compile(fullgraph=True) matching eager.

Compilation is slow on a small CPU, so the compile tests are few and tiny; together they
take well under a minute here.
"""

import pytest
import torch

import ncl_kernels as nk

from conftest import random_embeddings, random_scores

OPS = torch.ops.ncl_kernels


def _dense_args(S, scale_t, backend="torch", **kw):
    opts = dict(scale_f=0.0 if scale_t is not None else 7.0, backend=backend,
                row_targets=None, col_targets=None, row_mass=None, col_mass=None, f=None,
                g=None, n_iters=3, w_row=0.5, w_col=0.5)
    opts.update(kw)
    return S, scale_t, *opts.values()


def _solved(S, s=7.0):
    return OPS.loss(*_dense_args(S, None, scale_f=s), False)


@pytest.mark.parametrize("case", ["default", "targets_masses", "given_biases"])
def test_opcheck_forward_ops(backend, case):
    S = random_scores(7, 5, torch.float64, seed=1).requires_grad_()
    x, y = random_embeddings(7, 5, 6, torch.float64, seed=1)
    x.requires_grad_(), y.requires_grad_()
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    kw = {}
    if case == "targets_masses":
        kw = dict(row_targets=torch.tensor([0, 1, -1, 3, 4, 0, 2]),
                  col_targets=torch.tensor([6, -1, 2, 3, 0]),
                  row_mass=torch.rand(7, dtype=torch.float64) + 0.5, w_row=0.7)
    elif case == "given_biases":
        sol = nk.sinkhorn(S.detach(), 7.0, n_iters=3, tol=None)
        kw = dict(f=sol.f, g=sol.g)
    dense = _dense_args(S, s, backend, **kw)
    torch.library.opcheck(OPS.loss.default, (*dense, False))
    xy = (x, y, *dense[1:])
    torch.library.opcheck(OPS.loss_xy.default, xy)


@pytest.mark.parametrize("need", [True, False])
def test_opcheck_backward_ops(backend, need):
    S = random_scores(7, 5, torch.float64, seed=2)
    x, y = random_embeddings(7, 5, 6, torch.float64, seed=2)
    _, f, g, lse_row, lse_col = _solved(S)
    grad = torch.tensor(1.5, dtype=torch.float64)
    common = (None, 7.0, backend, None, None, f, g, lse_row, lse_col, 0.5, 0.5)
    torch.library.opcheck(OPS.loss_backward.default, (grad, S, *common, need))
    torch.library.opcheck(OPS.loss_backward_.default, (grad, S.clone(), *common))
    _, f, g, lse_row, lse_col = OPS.loss_xy(x, y, None, 7.0, backend, None, None, None, None,
                                            None, None, 3, 0.5, 0.5)
    torch.library.opcheck(OPS.loss_xy_backward.default,
                          (grad, x, y, None, 7.0, backend, None, None, f, g, lse_row,
                           lse_col, 0.5, 0.5, need, not need))


def test_ops_raise_the_validation_errors():
    # data checks live inside the ops: the op itself refuses bad data
    S = random_scores(4, 3, torch.float32)
    S[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _solved(S)
    with pytest.raises(ValueError, match="scale must be finite"):
        OPS.loss(*_dense_args(random_scores(4, 3, torch.float32), torch.tensor(-1.0)), False)


def _run(fn, dtype, inputs, needs):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t, need in zip(leaves, needs) if need]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dense", "dense_inplace", "embeddings"])
def test_compiled_training_step_matches_eager(backend, form):
    x, y = random_embeddings(9, 7, 8, torch.float32, seed=3)
    s = torch.tensor(10.0)

    def step(x, y, s):
        if form == "embeddings":
            return nk.ncl_loss_embeddings(x, y, s, backend=backend)
        return nk.ncl_loss(x @ y.T, s, inplace_backward=form == "dense_inplace",
                           backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    eager = _run(step, torch.float32, (x, y, s), (True, True, True))
    ours = _run(compiled, torch.float32, (x, y, s), (True, True, True))
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # a second batch of a new size runs through the same compiled function
    x2, y2 = random_embeddings(5, 6, 8, torch.float32, seed=4)
    eager = _run(step, torch.float32, (x2, y2, s), (True, True, False))
    ours = _run(compiled, torch.float32, (x2, y2, s), (True, True, False))
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_float_scale_and_bad_data_raises():
    x, y = random_embeddings(6, 6, 4, torch.float32, seed=5)

    @torch.compile(fullgraph=True)
    def step(x, y):
        return nk.ncl_loss_embeddings(x, y, 12.0, backend="torch")

    expect = nk.ncl_loss_embeddings(x, y, 12.0, backend="torch")
    torch.testing.assert_close(step(x, y), expect)
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        step(bad, y)


@pytest.mark.slow
def test_compiled_nclloss_with_queue_matches_eager():
    # the queue changes shape while it fills (0, 4, then 6 rows): a recompile each time,
    # then a stable graph; buffer updates happen inside the compiled step
    eager = nk.NCLLoss(n_iters=3, queue_size=6, backend="torch")
    module = nk.NCLLoss(n_iters=3, queue_size=6, backend="torch")
    compiled = torch.compile(module, fullgraph=True)
    for step in range(4):
        x, y = random_embeddings(4, 4, 8, torch.float32, seed=10 + step)
        s = torch.tensor(10.0)
        want = _run(eager, torch.float32, (x, y, s), (True, True, True))
        got = _run(compiled, torch.float32, (x, y, s), (True, True, True))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.equal(module.queue_text, eager.queue_text)
