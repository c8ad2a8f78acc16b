"""No silent wrong answer: each class of defect from the adversarial pass (issue 16), with
the instance that was found and others of its class. Every public output is finite or the
call raises a ValueError/TypeError saying which input caused it."""

import math

import numpy as np
import pytest
import torch

import ncl_kernels as nk

from conftest import random_embeddings, random_scores

INF = float("inf")


# -- 1. accepted input, wrong answer: -1 in an index argument ---------------------------
def test_caption_marked_minus_one_has_no_term_and_no_mass(backend):
    gen = torch.Generator().manual_seed(0)
    t, v = torch.randn(4, 3, generator=gen), torch.randn(2, 3, generator=gen)
    c = torch.tensor([-1, 0, 1, 1])
    for mode in ("dense", "streaming"):
        loss = nk.NCLLoss(n_iters=0, mode=mode, backend=backend)
        honoured = loss(t, v, 1.0, caption_to_video=c)
        without = loss(t[1:], v, 1.0, caption_to_video=c[1:])
        torch.testing.assert_close(honoured, without)
        for n_iters in (3, 10):
            ncl = nk.NCLLoss(n_iters=n_iters, mode=mode, backend=backend)
            torch.testing.assert_close(ncl(t, v, 1.0, caption_to_video=c),
                                       ncl(t[1:], v, 1.0, caption_to_video=c[1:]))


def test_minus_one_in_the_other_index_arguments():
    S = random_scores(5, 4, torch.float32, seed=1)
    # row/col targets: -1 is "no term"; below -1 is refused
    base = nk.ncl_loss(S, 3.0, row_targets=torch.tensor([0, 1, 2, 3, -1]))
    assert torch.isfinite(base)
    with pytest.raises(ValueError, match="row_targets"):
        nk.ncl_loss(S, 3.0, row_targets=torch.tensor([0, 1, 2, 3, -2]))
    # a caption -> video index for retrieval has no -1: refused with its position
    with pytest.raises(ValueError, match="caption_to_video entries must be video indices "
                                         ">= 0; got -1 at position 0"):
        nk.retrieval.text_to_video_targets(torch.tensor([-1, -1]))
    # retrieval targets: -1 pads; a query with none is refused
    x, y = random_embeddings(3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="row 1 has none"):
        nk.retrieval.ranks(x, y, torch.tensor([[0, -1], [-1, -1], [2, 3]]))


# -- 2. inf/NaN out, no exception -------------------------------------------------------
def test_a_target_on_a_zero_mass_column_is_refused(backend):
    S = random_scores(4, 4, torch.float32, seed=2)
    with pytest.raises(ValueError, match="row_targets: row 0's target column 0 has "
                                         "potential -inf"):
        nk.ncl_loss(S, 1.0, col_mass=torch.tensor([0, 4 / 3, 4 / 3, 4 / 3]), backend=backend)
    x, y = random_embeddings(4, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="col_targets: column 2's target row 2"):
        nk.ncl_loss_embeddings(x, y, 1.0, row_mass=torch.tensor([4 / 3, 4 / 3, 0, 4 / 3]),
                               backend=backend)


def test_given_biases_with_minus_inf_at_a_target_are_refused(backend):
    S = random_scores(3, 3, torch.float32, seed=3)
    f, g = torch.zeros(3), torch.zeros(3)
    g[1] = -INF
    with pytest.raises(ValueError, match="target column 1 has potential -inf"):
        nk.ncl_loss(S, 1.0, f=f, g=g, backend=backend)
    with pytest.raises(ValueError, match="potential -inf"):
        nk.ncl_loss(S, 1.0, f=torch.full((3,), -INF), g=torch.full((3,), -INF),
                    backend=backend)


def test_overflowing_logits_raise_instead_of_nan(backend):
    with pytest.raises(ValueError, match="overflow"):
        nk.sinkhorn(torch.full((2, 2), 1e38), 10.0, strict=True, backend=backend)
    with pytest.raises(ValueError, match="overflow"):
        nk.sinkhorn(torch.full((2, 2), 1e38), 10.0, tol=None, n_iters=3, backend=backend)
    big = torch.full((3, 2), 1e20)
    for materialize in (False, True):
        with pytest.raises(ValueError, match="overflow|not finite"):
            nk.ncl_loss_embeddings(big, big, 1.0, materialize=materialize, backend=backend)
        with pytest.raises(ValueError, match="overflow|not finite"):
            nk.sinkhorn_embeddings(big, big, 1.0, materialize=materialize, backend=backend)
    with pytest.raises(ValueError, match="overflow"):
        nk.retrieval.topk(big, big, 2)
    with pytest.raises(ValueError, match="not finite"):
        nk.retrieval.gallery_bias(big, big, method="qbnorm", backend=backend)
    with pytest.raises(ValueError, match="overflowed"):
        nk.retrieval.ranks(big, big, torch.tensor([0, 1, 2]))


# -- 3. devices -------------------------------------------------------------------------
def test_every_tensor_argument_is_checked_against_the_scores_device():
    S = random_scores(4, 3, torch.float32, seed=4)
    meta = dict(device="meta")
    with pytest.raises(ValueError, match="scale is on meta"):
        nk.ncl_loss(S, torch.tensor(2.0, **meta))
    with pytest.raises(ValueError, match="scale is on meta"):
        nk.sinkhorn(S, torch.tensor(2.0, **meta))
    cases = [
        (nk.sinkhorn, dict(row_mass=torch.ones(4, **meta)), "row_mass"),
        (nk.sinkhorn, dict(col_mass=torch.ones(3, **meta)), "col_mass"),
        (nk.sinkhorn, dict(init_g=torch.zeros(3, **meta)), "init_g"),
        (nk.ncl_loss, dict(row_targets=torch.zeros(4, dtype=torch.int64, **meta)),
         "row_targets"),
        (nk.ncl_loss, dict(f=torch.zeros(4, **meta), g=torch.zeros(3, **meta)), "f"),
    ]
    for fn, kw, name in cases:
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            fn(S, 2.0, **kw)
    x, y = random_embeddings(4, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="caption_to_video is on meta"):
        nk.NCLLoss()(x, y, 2.0, caption_to_video=torch.zeros(4, dtype=torch.int64, **meta))
    with pytest.raises(ValueError, match="bias is on meta"):
        nk.retrieval.ranks(x, y, torch.arange(4), bias=torch.zeros(4, **meta))
    # a CPU scalar with scores elsewhere is allowed (as PyTorch allows); the result is right
    assert torch.isfinite(nk.ncl_loss(S, torch.tensor(2.0)))


# -- 4. aliasing ------------------------------------------------------------------------
def test_a_bias_sharing_memory_with_the_scores_is_read_before_the_write(backend):
    S = random_scores(300, 200, torch.float32, seed=5)
    expect = nk.apply_biases_(S.clone(), 1.0, None, S[0].clone(), backend=backend)
    got = S.clone()
    nk.apply_biases_(got, 1.0, None, got[0], backend=backend)
    assert torch.equal(got, expect)
    got = S.clone()
    nk.apply_biases_(got, 2.0, got[:, 7].contiguous(), got[3], backend=backend)
    assert torch.isfinite(got).all()


def test_chunked_torch_backend_is_not_fooled_by_aliasing(small_chunks):
    S = random_scores(3000 // 100, 20, torch.float32, seed=6)
    expect = nk.apply_biases_(S.clone(), 1.0, None, S[0].clone(), backend="torch")
    got = S.clone()
    nk.apply_biases_(got, 1.0, None, got[0], backend="torch")
    assert torch.equal(got, expect)


# -- 5. strides -------------------------------------------------------------------------
def test_read_only_passes_take_expanded_scores_on_every_backend(backend):
    b = torch.randn(1, 5)
    E = b.expand(7, 5)
    want = nk.sinkhorn(E.contiguous(), 2.0, n_iters=5, tol=None, backend=backend)
    got = nk.sinkhorn(E, 2.0, n_iters=5, tol=None, backend=backend)
    torch.testing.assert_close(got.f, want.f)
    torch.testing.assert_close(got.g, want.g)
    torch.testing.assert_close(nk.ncl_loss(E, 2.0, backend=backend),
                               nk.ncl_loss(E.contiguous(), 2.0, backend=backend))


def test_writing_passes_refuse_overlapping_rows_before_writing(backend):
    b = torch.randn(1, 5)
    E = b.expand(7, 5)
    with pytest.raises(ValueError, match="overlap"):
        nk.apply_biases_(E, 2.0, backend=backend)
    with pytest.raises(ValueError, match="overlap"):
        nk.ncl_loss(E, 2.0, inplace_backward=True, backend=backend)
    base = torch.randn(20)
    rows = base.as_strided((4, 5), (3, 1))   # row stride 3 < 5 columns
    before = base.clone()
    with pytest.raises(ValueError, match="overlap"):
        nk.apply_biases_(rows, 2.0, backend=backend)
    assert torch.equal(base, before)


# -- 6. a warm start with -inf ----------------------------------------------------------
def test_minus_inf_in_init_g_does_not_remove_a_column(backend):
    S = torch.tensor([[0.0, -INF], [-INF, 0.0]])
    out = nk.sinkhorn(S, 1.0, init_g=torch.tensor([-INF, 0.0]), backend=backend)
    ref = nk.sinkhorn(S, 1.0, backend=backend)
    assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all()
    torch.testing.assert_close(out.f + out.g.flip(0), ref.f + ref.g.flip(0))


# -- 7. a second backward through an in-place step --------------------------------------
def test_a_second_backward_of_an_inplace_step_says_why():
    x, y = random_embeddings(6, 6, 4, torch.float32)
    x.requires_grad_()
    loss = nk.NCLLoss(mode="dense")(x, y, 5.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run a second time.*streaming"):
        loss.backward()
    # the streaming mode supports it
    x.grad = None
    loss = nk.NCLLoss(mode="streaming")(x, y, 5.0)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


# -- 8. in-place on a leaf's view -------------------------------------------------------
def test_inplace_backward_on_a_view_of_a_leaf_is_refused():
    W = torch.randn(5, 8, requires_grad=True)
    before = W.detach().clone()
    with pytest.raises(ValueError, match="view of a leaf"):
        nk.ncl_loss(W[:, :4], 2.0, inplace_backward=True)
    assert torch.equal(W.detach(), before)
    # without inplace_backward the view is fine
    nk.ncl_loss(W[:, :4], 2.0).backward()
    assert torch.equal(W.detach(), before) and W.grad is not None


# -- 9. low precision -------------------------------------------------------------------
def test_a_float16_gradient_that_cannot_be_represented_is_refused():
    x, y = random_embeddings(4, 4, 8, torch.float16)
    S = (x.float() @ y.float().T).half().requires_grad_()
    loss = nk.ncl_loss(S, 1e6)
    with pytest.raises(ValueError, match="could overflow"):
        loss.backward()
    ok = S.detach().clone().requires_grad_()
    nk.ncl_loss(ok, 100.0).backward()
    assert torch.isfinite(ok.grad).all()
    # float16 embeddings: the gradients come back in float16 or the backward raises
    big = (x * 300).requires_grad_()
    for materialize in (False, True):
        loss = nk.ncl_loss_embeddings(big, y * 300, 1e3, materialize=materialize, n_iters=0)
        with pytest.raises(ValueError, match="float16 gradient of x contains inf"):
            loss.backward()


# -- 10. messages that name the wrong thing or nothing ----------------------------------
@pytest.mark.parametrize("mode", ["dense", "streaming"])
def test_nclloss_names_its_features_and_what_was_found(mode):
    x, y = random_embeddings(4, 4, 3, torch.float32)
    bad = x.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="text_features contains NaN"):
        nk.NCLLoss(mode=mode)(bad, y, 2.0)
    bad[1, 2] = math.inf
    with pytest.raises(ValueError, match="video_features contains inf"):
        nk.NCLLoss(mode=mode)(x, bad, 2.0)


def test_messages_name_the_argument():
    S = random_scores(4, 3, torch.float32)
    with pytest.raises(TypeError, match="row_mass must be a 1-D tensor or a sequence of "
                                        "numbers; got str 'abc'"):
        nk.sinkhorn(S, row_mass="abc")
    with pytest.raises(ValueError, match="stream_above must be an integer"):
        nk.NCLLoss(stream_above="x")
    with pytest.raises(TypeError, match="weights must be a pair of numbers"):
        nk.ncl_loss(S, weights="12")
    with pytest.raises(ValueError, match="row_mass does not fit torch.float32"):
        nk.sinkhorn(S, row_mass=torch.full((4,), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="entry 'b' lacks MnR"):
        m = nk.retrieval.metrics(torch.tensor([1, 2, 3]))
        nk.retrieval.format_metrics({"a": m, "b": {k: v for k, v in m.items() if k != "MnR"}})
    array = np.zeros((1000, 1000), dtype=np.float32)
    with pytest.raises(TypeError) as info:
        nk.sinkhorn(array)
    assert len(str(info.value)) < 200 and "numpy.ndarray of shape (1000, 1000)" in str(
        info.value)
