"""NCLLoss: queue semantics step by step, several captions per video, checkpoints."""

import pytest
import torch

import ncl_kernels as nk

from conftest import rel_err

D = 6


def _batch(step, n=4, v=None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + step)
    v = n if v is None else v
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=gen, dtype=dtype), dim=1)
    y = torch.nn.functional.normalize(torch.randn(v, D, generator=gen, dtype=dtype), dim=1)
    return x, y


def _grads(fn, x, y, scale):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(scale, dtype=x.dtype, requires_grad=True)
    loss = fn(x, y, s)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


def _assert_same(a, b, tol=1e-10):
    for name, u, w in zip(("loss", "dx", "dy", "dscale"), a, b):
        assert rel_err(u, w) < tol, name


#: the plain queue semantics, without the terms a queue turns on by default
PLAIN = dict(bias_gradient=False, offset_penalty=0.0)


def _targets(n, v, kq_rows, kq_cols):
    y = torch.cat([torch.arange(n), torch.full((kq_rows,), -1)])
    z = torch.cat([torch.arange(v), torch.full((kq_cols,), -1)])
    return y, z


@pytest.mark.parametrize("mode", ["dense", "streaming"])
def test_queue_as_negatives_step_by_step(backend, mode):
    K = 6
    module = nk.NCLLoss(n_iters=5, queue_size=K, queue_as_negatives=True, mode=mode,
                        backend=backend, **PLAIN)
    qx = torch.empty(0, D, dtype=torch.float64)
    qy = torch.empty(0, D, dtype=torch.float64)
    for step in range(4):   # batches of 4, K = 6: the queue fills, then wraps
        x, y = _batch(step)
        rt, ct = _targets(4, 4, qx.shape[0], qy.shape[0])
        expect = _grads(lambda a, b, s: nk.ncl_loss_embeddings(
            torch.cat([a, qx]), torch.cat([b, qy]), s, n_iters=5, row_targets=rt,
            col_targets=ct, backend=backend), x, y, 20.0)
        got = _grads(module, x, y, 20.0)
        _assert_same(got, expect)
        # the current batch is enqueued after its loss; the oldest rows fall out
        qx, qy = torch.cat([qx, x])[-K:], torch.cat([qy, y])[-K:]
        text, video, _ = module.queued()
        assert torch.equal(text, qx) and torch.equal(video, qy)
        assert not module.queue_text.requires_grad
        assert module.queue_text.shape == (K, D)  # a ring of fixed size


def test_queue_only_shapes_the_biases(backend):
    K = 5
    module = nk.NCLLoss(n_iters=6, queue_size=K, queue_as_negatives=False, backend=backend,
                        mode="streaming", **PLAIN)
    qx = torch.empty(0, D, dtype=torch.float64)
    qy = torch.empty(0, D, dtype=torch.float64)
    for step in range(3):
        x, y = _batch(step)

        def expect_fn(a, b, s):
            sol = nk.sinkhorn_embeddings(torch.cat([a, qx]).detach(),
                                         torch.cat([b, qy]).detach(), s.detach(), n_iters=6,
                                         tol=None, backend=backend)
            return nk.ncl_loss_embeddings(a, b, s, f=sol.f[:4], g=sol.g[:4], backend=backend)

        _assert_same(_grads(module, x, y, 15.0), _grads(expect_fn, x, y, 15.0))
        qx, qy = torch.cat([qx, x])[-K:], torch.cat([qy, y])[-K:]
    # dense mode gives the same numbers
    dense = nk.NCLLoss(n_iters=6, queue_size=K, queue_as_negatives=False, mode="dense",
                       backend=backend, **PLAIN)
    dense.load_state_dict(module.state_dict())
    x, y = _batch(9)
    stream = _grads(module, x, y, 15.0)
    _assert_same(_grads(dense, x, y, 15.0), stream)


def test_several_captions_per_video(backend):
    x, y = _batch(0, n=7, v=4)
    c2v = torch.tensor([2, 0, 2, 1, 0, 2, 1])   # video 3 has no caption in this batch
    first = torch.tensor([1, 3, 0, -1])
    counts = torch.tensor([2.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    for mode in ("dense", "streaming"):
        module = nk.NCLLoss(n_iters=5, mode=mode, backend=backend, positives="first")
        got = _grads(lambda a, b, s: module(a, b, s, caption_to_video=c2v), x, y, 10.0)
        expect = _grads(lambda a, b, s: nk.ncl_loss_embeddings(
            a, b, s, n_iters=5, row_targets=c2v, col_targets=first,
            col_mass=counts * 7 / 7, backend=backend), x, y, 10.0)
        _assert_same(got, expect)
    # with a queue, the queued videos keep their caption counts as masses (video 3, with
    # none, has mass 0: it takes no part, as an empty slot)
    module = nk.NCLLoss(n_iters=5, queue_size=4, queue_as_negatives=True, backend=backend,
                        positives="first", **PLAIN)
    module(x, y, 10.0, caption_to_video=c2v)
    assert torch.equal(module.queue_video_mass, counts)
    assert torch.equal(module.queued()[2], counts[:3]) and torch.equal(module.queued()[1],
                                                                         y[:3])
    x2, y2 = _batch(1, n=5, v=5)
    got = _grads(module, x2, y2, 10.0)
    mass = torch.cat([torch.ones(5, dtype=torch.float64), counts])
    rt, ct = _targets(5, 5, 4, 4)
    expect = _grads(lambda a, b, s: nk.ncl_loss_embeddings(
        torch.cat([a, x[-4:]]), torch.cat([b, y]), s, n_iters=5, row_targets=rt,
        col_targets=ct, col_mass=mass * 9 / mass.sum(), backend=backend), x2, y2, 10.0)
    _assert_same(got, expect)


def test_checkpoint_round_trip_continues_identically():
    def train(module, steps, params):
        out = []
        opt = torch.optim.SGD(params, lr=0.1)
        for step in steps:
            x, y = _batch(step)
            opt.zero_grad()
            loss = module(params[0] + x, params[1] + y, params[2].exp())
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return out

    def fresh_params():
        return [torch.zeros(4, D, dtype=torch.float64, requires_grad=True),
                torch.zeros(4, D, dtype=torch.float64, requires_grad=True),
                torch.tensor(2.5, dtype=torch.float64, requires_grad=True)]

    a = nk.NCLLoss(n_iters=4, queue_size=6)
    pa = fresh_params()
    train(a, range(3), pa)
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    assert saved["queue_text"].shape == (6, D)
    b = nk.NCLLoss(n_iters=4, queue_size=6)
    b.load_state_dict(saved)
    pb = [p.detach().clone().requires_grad_() for p in pa]
    for name, _ in a.named_buffers():
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    la, lb = train(a, range(3, 6), pa), train(b, range(3, 6), pb)
    assert all(torch.equal(u, w) for u, w in zip(la, lb))
    assert all(torch.equal(u, w) for u, w in zip(pa, pb))


def test_queue_moves_with_the_module():
    module = nk.NCLLoss(queue_size=3)
    x, y = _batch(0, dtype=torch.float32)
    module(x, y, 10.0)
    names = {name for name, _ in module.named_buffers()}
    assert names == {f"queue_{side}{part}" for side in ("text", "video")
                     for part in ("", "_mass", "_next")}
    module.double()
    assert module.queue_text.dtype == torch.float64
    module.to("meta")
    assert module.queue_text.device.type == "meta"
    module.reset_queue()
    assert module.queue_text.shape[0] == 0


def test_no_queue_matches_the_functional_loss(backend):
    x, y = _batch(3, n=9)
    for mode in ("dense", "streaming"):
        module = nk.NCLLoss(n_iters=3, weights=(0.8, 0.2), mode=mode, backend=backend)
        _assert_same(_grads(module, x, y, 30.0), _grads(
            lambda a, b, s: nk.ncl_loss_embeddings(a, b, s, n_iters=3, weights=(0.8, 0.2),
                                                   backend=backend), x, y, 30.0))
    assert module.queue_text.numel() == 0


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="queue_size"):
        nk.NCLLoss(queue_size=-1)
    with pytest.raises(TypeError, match="queue_as_negatives"):
        nk.NCLLoss(queue_as_negatives="no")
    x, y = _batch(0, n=5, v=3)
    with pytest.raises(ValueError, match="caption_to_video"):
        nk.NCLLoss()(x, y, 10.0, caption_to_video=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(TypeError, match="caption_to_video"):
        nk.NCLLoss()(x, y, 10.0, caption_to_video=torch.tensor([0, 1, 2, 2, 0.0]))
    module = nk.NCLLoss(queue_size=4)
    module(x[:3], y, 10.0)
    with pytest.raises(ValueError, match="reset_queue"):
        module(torch.ones(3, D + 1), torch.ones(3, D + 1), 10.0)


# -- the training terms beyond the loss op (docs/training.md) -----------------------------

import python_ref as ref  # noqa: E402

C2V = torch.tensor([2, 0, 2, 1, 0, 2, 1])   # 7 captions of videos 0..2; video 3 has none
COUNTS = torch.tensor([2.0, 2.0, 3.0, 0.0], dtype=torch.float64)


def _oracle_biases(X, Y, scale, n_iters, col_mass):
    sol = ref.sinkhorn(X.detach() @ Y.detach().T, scale, col_mass=col_mass, n_iters=n_iters,
                       tol=None)
    return sol.f, sol.g


@pytest.mark.parametrize("positives", ["all", "mean", "first"])
@pytest.mark.parametrize("mode", ["dense", "streaming"])
def test_all_positives_match_the_oracle(backend, mode, positives):
    """Every caption of a video is its positive in the video-to-text term."""
    x, y = _batch(0, n=7, v=4)
    module = nk.NCLLoss(n_iters=5, positives=positives, mode=mode, backend=backend,
                        bias_gradient=False)
    got = _grads(lambda a, b, s: module(a, b, s, caption_to_video=C2V), x, y, 10.0)
    expect = _grads(lambda a, b, s: ref.ncl_loss_all_positives(
        a @ b.T, s, row_targets=C2V, positives=positives, n_iters=5, col_mass=COUNTS),
        x, y, 10.0)
    _assert_same(got, expect)


def test_first_positive_oracle_is_the_plain_loss():
    x, y = _batch(1, n=7, v=4)
    S = x @ y.T
    first = torch.tensor([1, 3, 0, -1])
    a = ref.ncl_loss_all_positives(S, 7.0, row_targets=C2V, positives="first", n_iters=3,
                                   col_mass=COUNTS)
    b = ref.ncl_loss(S, 7.0, row_targets=C2V, col_targets=first, n_iters=3, col_mass=COUNTS)
    assert rel_err(a, b) < 1e-14
    # with one caption per video every aggregate is the same
    one = torch.arange(4)
    values = [ref.ncl_loss_all_positives(S[:4], 7.0, row_targets=one, positives=p)
              for p in ("all", "mean", "first")]
    assert rel_err(values[0], values[2]) < 1e-14 and rel_err(values[1], values[2]) < 1e-14


@pytest.mark.parametrize("negatives", [False, True])
@pytest.mark.parametrize("positives", ["first", "all"])
@pytest.mark.parametrize("mode", ["dense", "streaming"])
def test_own_bias_gradient_matches_the_oracle(backend, mode, positives, negatives):
    """The bias gradient, step by step with a queue (videos without captions included)."""
    K = 6
    module = nk.NCLLoss(n_iters=5, queue_size=K, queue_as_negatives=negatives, mode=mode,
                        positives=positives, bias_gradient=True, offset_penalty=0.0,
                        backend=backend)
    qx = torch.empty(0, D, dtype=torch.float64)
    qy = torch.empty(0, D, dtype=torch.float64)
    qm = torch.empty(0, dtype=torch.float64)
    for step in range(3):
        x, y = _batch(step, n=7, v=4)
        mass = torch.cat([COUNTS, qm])
        col_mass = mass * ((7 + qx.shape[0]) / mass.sum())

        def expect_fn(a, b, s):
            X, Y = torch.cat([a, qx]), torch.cat([b, qy])
            f, g = _oracle_biases(X, Y, float(s.detach()), 5, col_mass)
            block = (X.shape[0], Y.shape[0]) if negatives else (7, 4)
            rows = torch.cat([C2V, torch.full((block[0] - 7,), -1)])
            return ref.ncl_loss_own_bias(X @ Y.T, s, f, g, block=block, row_targets=rows,
                                         positives=positives, col_mass=col_mass)

        got = _grads(lambda a, b, s: module(a, b, s, caption_to_video=C2V), x, y, 10.0)
        _assert_same(got, _grads(expect_fn, x, y, 10.0), tol=1e-9)
        qx, qy, qm = torch.cat([qx, x])[-K:], torch.cat([qy, y])[-K:], torch.cat([qm, COUNTS])[-K:]


def test_own_bias_gradient_vanishes_for_converged_batch_biases(backend):
    """Without a queue and with converged biases the term adds nothing."""
    x, y = _batch(2, n=6)
    plain = nk.NCLLoss(n_iters=300, backend=backend)
    with_term = nk.NCLLoss(n_iters=300, bias_gradient=True, backend=backend)
    _assert_same(_grads(with_term, x, y, 5.0), _grads(plain, x, y, 5.0), tol=1e-8)


def test_offset_penalty_adds_the_spread_of_the_mean_logits(backend):
    x, y = _batch(3, n=6)
    s = 12.0
    base = nk.NCLLoss(n_iters=4, backend=backend)(x, y, s)
    got = nk.NCLLoss(n_iters=4, offset_penalty=0.3, backend=backend)(x, y, s)
    rows, cols = s * (x @ y.mean(0)), s * (y @ x.mean(0))
    spread = rows.var(unbiased=False) + cols.var(unbiased=False)
    assert rel_err(got - base, 0.3 * spread) < 1e-10


def test_training_term_defaults_follow_the_queue(backend):
    plain = nk.NCLLoss()
    assert (plain.n_iters, plain.positives, plain.queue_as_negatives) == (20, "mean", False)
    assert (plain.bias_gradient, plain.offset_penalty) == (None, 0.0)
    # without a queue, the bias gradient is on for batches with captions_to_video
    x, y = _batch(4, n=7, v=4)
    on = nk.NCLLoss(n_iters=5, bias_gradient=True, backend=backend)
    for module in (plain, on):
        module.n_iters = 5
    with_c2v = [_grads(lambda a, b, s, m=m: m(a, b, s, caption_to_video=C2V), x, y, 10.0)
                for m in (plain, on)]
    _assert_same(*with_c2v)
    x, y = _batch(4, n=4)
    off = nk.NCLLoss(n_iters=5, bias_gradient=False, backend=backend)
    _assert_same(_grads(plain, x, y, 10.0), _grads(off, x, y, 10.0))
    queued = nk.NCLLoss(queue_size=8)
    assert queued.bias_gradient and queued.offset_penalty == nk.nn.OFFSET_PENALTY
    assert nk.NCLLoss(queue_size=8, offset_penalty=0, bias_gradient=False).offset_penalty == 0
    assert "offset_penalty" in repr(queued)


def test_bad_training_term_arguments():
    with pytest.raises(ValueError, match="positives"):
        nk.NCLLoss(positives="best")
    with pytest.raises(TypeError, match="bias_gradient"):
        nk.NCLLoss(bias_gradient=1)
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="offset_penalty"):
            nk.NCLLoss(offset_penalty=bad)
