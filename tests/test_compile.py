"""The ops: opcheck for every op on every backend here, and torch.compile(fullgraph=True)
of every public entry that promises it, against eager (values and gradients).

Compilation is slow on a small CPU, so the compiled problems are tiny and the compile
tests are marked slow.
"""

import pytest
import torch
from op_cases import DISTRIBUTED_OPS, entry_cases, primitive_cases

import ncl_kernels as nk
from ncl_kernels import _library

from conftest import random_embeddings, random_scores

OPS = torch.ops.ncl_kernels


def _opcheck(name, backend, args):
    torch.library.opcheck(_library.op(name, backend), args)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_every_primitive(backend, dtype):
    for name, cases in primitive_cases(dtype).items():
        for args in cases:
            _opcheck(name, backend, args)


@pytest.mark.slow
def test_opcheck_every_primitive_auto():
    for name, cases in primitive_cases(torch.float32).items():
        for args in cases:
            _opcheck(name, "auto", args)


@pytest.mark.slow
def test_opcheck_every_entry_op(backend):
    for name, cases in entry_cases().items():
        for args in cases:
            _opcheck(name, backend, args)


def test_every_op_has_an_opcheck_case():
    from ncl_kernels import ops
    covered = set(primitive_cases()) | set(entry_cases())
    assert set(ops.PRIMITIVE_OPS) <= covered
    assert set(_library.defined()) == covered | set(DISTRIBUTED_OPS)


def test_ops_that_write_bump_the_version_counter(backend):
    # so autograd refuses a saved tensor that an op has overwritten, as for PyTorch's ops
    S = random_scores(4, 3, torch.float32)
    before = S._version
    _library.op("apply_biases_", backend)(S, 2.0, None, None)
    assert S._version > before
    x = torch.randn(4, 3, requires_grad=True)
    y = x * 2.0
    used = y.exp()                       # saves its output for backward
    _library.op("apply_biases_", backend)(used.detach(), 1.0, None, None)  # same storage
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        used.sum().backward()


def test_ops_raise_the_validation_errors():
    # data checks live inside the ops: the op itself refuses bad data
    S = random_scores(4, 3, torch.float32)
    S[1, 2] = float("nan")
    solve = (None, 7.0, None, None, None, 3, None, 1)
    with pytest.raises(ValueError, match="NaN"):
        OPS.sinkhorn(S, *solve)
    with pytest.raises(ValueError, match="scale must be finite"):
        OPS.ncl_loss(random_scores(4, 3, torch.float32), torch.tensor(-1.0), 0.0, None, None,
                     None, None, None, None, 3, 0.5, 0.5, False)


# ---------------------------------------------------------------- compiled entries
def _run(fn, inputs, needs):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t, need in zip(leaves, needs) if need]


def _same(got, want, rtol=1e-6, atol=1e-7):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def recompiles(monkeypatch):
    """Counts dynamo's compiles (the first compile of each function included)."""
    from torch._dynamo.utils import counters
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]


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
    _same(_run(compiled, (x, y, s), (True, True, True)), _run(step, (x, y, s), (True,) * 3))
    # a second batch of a new size runs through the same compiled function
    x2, y2 = random_embeddings(5, 6, 8, torch.float32, seed=4)
    _same(_run(compiled, (x2, y2, s), (True, True, False)),
          _run(step, (x2, y2, s), (True, True, False)))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dense", "embeddings"])
def test_compiled_sinkhorn_without_tol(backend, form):
    x, y = random_embeddings(9, 7, 8, torch.float32, seed=5)
    mass = torch.rand(7, dtype=torch.float32) + 0.5
    mass = mass * (9 / mass.sum())   # outside the compiled function: inductor may round
    init_g = torch.randn(7)          # its own arithmetic differently from eager

    def solve(x, y, s):
        opts = dict(col_mass=mass, n_iters=6, tol=None, init_g=init_g, backend=backend)
        if form == "dense":
            return nk.sinkhorn(x @ y.T, s, **opts)
        return nk.sinkhorn_embeddings(x, y, s, **opts)

    s = torch.tensor(12.0)
    got, want = torch.compile(solve, fullgraph=True)(x, y, s), solve(x, y, s)
    assert got.n_iters == want.n_iters == 6
    _same((got.f, got.g, got.error), (want.f, want.g, want.error))


@pytest.mark.slow
def test_compiled_gallery_bias_without_tol(backend):
    bank, gallery = random_embeddings(12, 7, 8, torch.float32, seed=6)

    def both(b, g):
        ncl = nk.retrieval.gallery_bias(b, g, 15.0, n_iters=8, tol=None, backend=backend)
        qb = nk.retrieval.gallery_bias(b, g, torch.tensor(15.0), method="qbnorm",
                                       backend=backend)
        return ncl, qb

    _same(torch.compile(both, fullgraph=True)(bank, gallery), both(bank, gallery))


@pytest.mark.slow
def test_compiled_data_checks_still_raise_value_errors():
    x, y = random_embeddings(6, 6, 4, torch.float32, seed=5)

    @torch.compile(fullgraph=True)
    def step(x, y):
        return (nk.ncl_loss_embeddings(x, y, 12.0, backend="torch")
                + nk.sinkhorn(x @ y.T, 12.0, n_iters=2, tol=None, backend="torch").f.sum())

    step(x, y)
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="x contains inf"):
        step(bad, y)
    masked = torch.full((6, 6), float("-inf"))
    with pytest.raises(ValueError, match="infeasible"):
        torch.compile(lambda S: nk.sinkhorn(S, 1.0, tol=None, n_iters=2),
                      fullgraph=True)(masked)


NCLLOSS_MODES = [
    dict(mode="dense"), dict(mode="streaming"),
    dict(mode="dense", queue_size=8), dict(mode="streaming", queue_size=8),
    dict(mode="dense", queue_size=8, queue_as_negatives=False),
    dict(mode="streaming", queue_size=8, queue_as_negatives=False),
]


@pytest.mark.slow
@pytest.mark.parametrize("captions", [False, True])
@pytest.mark.parametrize("options", NCLLOSS_MODES,
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_compiled_nclloss_matches_eager(options, captions):
    kw = dict(n_iters=3, backend="torch", **options)
    if "queue_size" in kw:
        kw["embed_dim"] = 8
    eager, module = nk.NCLLoss(**kw), nk.NCLLoss(**kw)
    compiled = torch.compile(module, fullgraph=True)
    c2v = torch.tensor([0, 1, 1, 2, -1, 3]) if captions else None
    for step in range(3):
        x, y = random_embeddings(6 if captions else 4, 4, 8, torch.float32, seed=10 + step)
        s = torch.tensor(10.0)

        def run(m, inputs):
            return _run(lambda a, b, t: m(a, b, t, caption_to_video=c2v), inputs,
                        (True, True, True))

        _same(run(compiled, (x, y, s)), run(eager, (x, y, s)))
        for name, buf in eager.named_buffers():
            assert torch.equal(getattr(module, name), buf), name


@pytest.mark.slow
def test_queue_of_eight_batches_fills_without_a_recompile(recompiles):
    batch, K = 4, 32
    module = nk.NCLLoss(n_iters=3, queue_size=K, embed_dim=8, queue_as_negatives=False,
                        backend="torch")
    compiled = torch.compile(module, fullgraph=True)
    s = torch.tensor(10.0, requires_grad=True)
    for step in range(20):
        x, y = random_embeddings(batch, batch, 8, torch.float32, seed=30 + step)
        compiled(x.requires_grad_(), y.requires_grad_(), s).backward()
    assert recompiles() == 1  # the first compile only
    assert int((module.queue_text_mass > 0).sum()) == K
