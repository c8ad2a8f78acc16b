"""ncl_loss / ncl_loss_embeddings / apply_biases_ against the float64 oracle."""

import pytest
import torch
import torch.nn.functional as F

import ncl_kernels as nk
import python_ref as ref

from conftest import STORAGE_DTYPES, assert_close, random_embeddings, random_scores, rel_err

SHAPES = [(1, 1), (7, 5), (5, 7), (67, 45), (1031, 67)]


def _ref_grads(S, scale, dtype, **kw):
    """Oracle loss and gradients evaluated in ``dtype``.

    In float64 the gradient is the exact one (taken w.r.t. a float64 copy of S); in float32
    it is rounded to S's storage dtype, as any implementation's must be.
    """
    S = S.detach().to(torch.float64 if dtype == torch.float64 else S.dtype).requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = ref.ncl_loss(S, s, dtype=dtype, **kw)
    loss.backward()
    return loss.detach(), S.grad, s.grad


def _our_grads(S, scale, backend, **kw):
    S = S.detach().clone().requires_grad_()
    s_dtype = torch.float64 if S.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=s_dtype, requires_grad=True)
    loss = nk.ncl_loss(S, s, backend=backend, **kw)
    loss.backward()
    return loss.detach(), S.grad, s.grad


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_gradients_match_oracle(backend, dtype, shape):
    S = random_scores(*shape, dtype, seed=shape[0] * 31 + shape[1])
    ours = _our_grads(S, 12.0, backend)
    r64 = _ref_grads(S, 12.0, torch.float64)
    r32 = _ref_grads(S, 12.0, torch.float32)
    for name, a, b, c in zip(("loss", "dS", "dscale"), ours, r64, r32):
        assert_close(a, b, c, dtype, name)
    assert ours[1].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_targets_weights_masses_and_given_biases(backend, dtype):
    S = random_scores(23, 31, dtype, seed=11)
    gen = torch.Generator().manual_seed(2)
    y = torch.randint(-1, 31, (23,), generator=gen)
    z = torch.randint(-1, 23, (31,), generator=gen)
    r = torch.rand(23, generator=gen) + 0.1
    kw = dict(row_targets=y, col_targets=z, weights=(0.7, 0.2), row_mass=r, n_iters=6)
    ours, r64 = _our_grads(S, 9.0, backend, **kw), _ref_grads(S, 9.0, torch.float64, **kw)
    for name, a, b in zip(("loss", "dS", "dscale"), ours, r64):
        assert rel_err(a, b) < (1e-10 if dtype == torch.float64 else 1e-5), name
    # given biases are used as they are (and are constants for the gradient)
    sol = ref.sinkhorn(S, 9.0, n_iters=3, tol=None)
    kw = dict(f=sol.f.float().to(dtype), g=sol.g.float().to(dtype), row_targets=y)
    ours, r64 = _our_grads(S, 9.0, backend, **kw), _ref_grads(S, 9.0, torch.float64, **kw)
    for name, a, b in zip(("loss", "dS", "dscale"), ours, r64):
        assert rel_err(a, b) < (1e-10 if dtype == torch.float64 else 1e-5), name


def test_queue_shaped_problem_defaults(backend):
    # 12 pairs plus 5 queued captions and 9 queued videos: extra rows/columns take part
    # in normalization but add no loss term.
    S = random_scores(17, 21, torch.float64, seed=12)
    ours, r64 = _our_grads(S, 20.0, backend), _ref_grads(S, 20.0, torch.float64)
    for a, b in zip(ours, r64):
        assert rel_err(a, b) < 1e-10


def test_zero_iterations_is_clip(backend):
    S = random_scores(9, 9, torch.float64, seed=13)
    loss = nk.ncl_loss(S, 30.0, n_iters=0, backend=backend)
    L = 30.0 * S
    labels = torch.arange(9)
    clip = 0.5 * (F.cross_entropy(L, labels) + F.cross_entropy(L.T, labels))
    assert abs(float(loss) - float(clip)) < 1e-12


def test_many_chunks_equal_one(backend, small_chunks):
    S = random_scores(40, 33, torch.float64, seed=14)
    ours, r64 = _our_grads(S, 7.0, backend), _ref_grads(S, 7.0, torch.float64)
    for a, b in zip(ours, r64):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_overwrites_exactly_when_asked(backend, dtype):
    S0 = random_scores(19, 14, dtype, seed=15)
    _, grad_ref, ds_ref = _our_grads(S0, 5.0, backend)

    S = S0.clone().requires_grad_()
    loss = nk.ncl_loss(S, 5.0, backend=backend)        # default: S is never written
    loss.backward()
    assert torch.equal(S.detach(), S0) and torch.equal(S.grad, grad_ref)

    leaf = S0.clone().requires_grad_()
    S = leaf * 1                      # an intermediate, as in NCLLoss's dense mode
    seen = []
    S.register_hook(lambda grad: seen.append(grad.data_ptr()))
    s = torch.tensor(5.0, requires_grad=True)
    loss = nk.ncl_loss(S, s, inplace_backward=True, backend=backend)
    loss.backward()
    assert torch.equal(leaf.grad, grad_ref)
    assert seen == [S.data_ptr()]                       # the storage was reused
    assert torch.equal(S.detach(), grad_ref)            # ... and now holds the gradient
    assert torch.equal(leaf.detach(), S0)               # the leaf itself was not touched
    assert rel_err(s.grad, ds_ref) < 1e-6               # dscale was taken before writing


def test_inplace_backward_on_strided_view(backend):
    big = random_scores(11, 20, torch.float32, seed=16)
    S0 = big[:, :13].clone()
    _, grad_ref, _ = _our_grads(S0, 4.0, backend)
    view = big[:, :13].detach().requires_grad_()
    assert view.stride(0) == 20
    nk.ncl_loss(view, 4.0, inplace_backward=True, backend=backend).backward()
    torch.testing.assert_close(view.grad, grad_ref, rtol=0, atol=0)
    torch.testing.assert_close(big[:, 13:], random_scores(11, 20, torch.float32, seed=16)[:, 13:])


def test_upstream_gradient_is_applied(backend):
    S0 = random_scores(8, 6, torch.float32, seed=17)
    S = S0.clone().requires_grad_()
    s = torch.tensor(3.0, requires_grad=True)
    (2.5 * nk.ncl_loss(S, s, backend=backend)).backward()
    _, g1, ds1 = _our_grads(S0, 3.0, backend)
    torch.testing.assert_close(S.grad, 2.5 * g1)
    torch.testing.assert_close(s.grad, 2.5 * ds1)


def test_masked_entries(backend):
    S = random_scores(12, 10, torch.float32, seed=18)
    S[0, 5:] = float("-inf")
    S[7:, 2] = float("-inf")
    ours, r64 = _our_grads(S, 6.0, backend), _ref_grads(S, 6.0, torch.float64)
    for name, a, b in zip(("loss", "dS", "dscale"), ours, r64):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, name
    assert (ours[1][0, 5:] == 0).all()


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 5), (7, 5, 40), (67, 45, 40)])
def test_embeddings_match_oracle_and_dense(backend, dtype, shape, small_chunks):
    n, m, d = shape
    x0, y0 = random_embeddings(n, m, d, dtype, seed=n + 1)

    def run(fn, **kw):
        exact = kw.get("dtype") == torch.float64  # the oracle's gradients, unrounded
        x, y = (t.detach().to(torch.float64 if exact else dtype).requires_grad_()
                for t in (x0, y0))
        wide = "dtype" in kw or dtype == torch.float64
        s = torch.tensor(15.0, dtype=torch.float64 if wide else torch.float32,
                         requires_grad=True)
        loss = fn(x, y, s, **kw)
        loss.backward()
        return loss.detach(), x.grad, y.grad, s.grad

    ours = run(nk.ncl_loss_embeddings, backend=backend)
    r64 = run(ref.ncl_loss_embeddings, dtype=torch.float64)
    r32 = run(ref.ncl_loss_embeddings, dtype=torch.float32)
    for name, a, b, c in zip(("loss", "dx", "dy", "dscale"), ours, r64, r32):
        assert_close(a, b, c, dtype, name)
    assert ours[1].dtype == ours[2].dtype == dtype
    if dtype in (torch.float32, torch.float64):   # the dense form gives the same numbers
        S = (x0 @ y0.T).detach().requires_grad_()
        dense = nk.ncl_loss(S, 15.0, backend=backend)
        assert rel_err(dense, ours[0]) < 1e-5


def test_embedding_gradient_only_where_needed(backend):
    x, y = random_embeddings(9, 7, 8, torch.float32)
    y.requires_grad_()
    nk.ncl_loss_embeddings(x, y, 10.0, backend=backend).backward()
    assert x.grad is None and y.grad is not None


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_apply_biases_in_place(backend, dtype):
    S0 = random_scores(37, 23, dtype, seed=19, strided=True)
    gen = torch.Generator().manual_seed(3)
    f, g = torch.randn(37, generator=gen), torch.randn(23, generator=gen)
    if dtype == torch.float64:
        f, g = f.double(), g.double()
    S = S0.clone()
    out = nk.apply_biases_(S, 4.0, f, g, backend=backend)
    assert out is S
    expect = ref.apply_biases(S0, 4.0, f, g, dtype=torch.float32 if dtype != torch.float64
                              else torch.float64).to(dtype)
    torch.testing.assert_close(S, expect, rtol=0, atol=0)
    only_f = S0.clone()
    nk.apply_biases_(only_f, 1.0, f=f, backend=backend)
    torch.testing.assert_close(only_f, (S0.double() + f.double()[:, None]).to(dtype))


def test_nclloss_module_dense_and_streaming_agree():
    x0, y0 = random_embeddings(24, 24, 16, torch.float32, seed=20)
    grads = []
    for mode in ("dense", "streaming"):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        loss = nk.NCLLoss(n_iters=4, mode=mode)(x, y, torch.tensor(20.0))
        loss.backward()
        grads.append((loss.detach(), x.grad, y.grad))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-5
    expect = ref.ncl_loss_embeddings(x0, y0, 20.0, n_iters=4)
    assert rel_err(grads[0][0], expect) < 1e-5


def test_cosine_scores_extreme_scales_stay_finite(backend):
    x, y = random_embeddings(33, 33, 16, torch.float32, seed=21)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for scale in (1e-3, 0.1, 10.0, 1000.0):
            S = (x @ y.T).to(dtype).requires_grad_()
            s = torch.tensor(scale, requires_grad=True)
            loss = nk.ncl_loss(S, s, backend=backend)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(S.grad).all()
            assert torch.isfinite(s.grad)
