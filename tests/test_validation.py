"""Bad input gets a clear Python exception before any kernel runs; data is left untouched."""

import math

import pytest
import torch

import ncl_kernels as nk

from conftest import random_embeddings, random_scores

S = random_scores(6, 5, torch.float32)
X, Y = random_embeddings(6, 5, 4, torch.float32)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(3), ValueError, "2-D"),
    (torch.zeros(2, 3, dtype=torch.int64), TypeError, "float32, float64"),
    (torch.zeros(2, 3, dtype=torch.complex64), TypeError, "float32, float64"),
    (torch.zeros(0, 3), ValueError, "at least one row"),
    (torch.zeros(3, 4).T, ValueError, "column stride 1"),
    (torch.tensor([[0.0, math.nan]]), ValueError, "NaN"),
    (torch.tensor([[0.0, math.inf]]), ValueError, r"\+inf"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
])
def test_bad_scores(bad, exc, match):
    for call in (lambda: nk.sinkhorn(bad), lambda: nk.ncl_loss(bad),
                 lambda: nk.apply_biases_(bad)):
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(scale=math.nan), ValueError, "scale"),
    (dict(scale=math.inf), ValueError, "scale"),
    (dict(scale=torch.ones(2)), TypeError, "scale"),
    (dict(scale="2"), TypeError, "scale"),
    (dict(n_iters=-1), ValueError, "n_iters"),
    (dict(n_iters=2.5), ValueError, "n_iters"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=-1e-3), ValueError, "tol"),
    (dict(check_every=0), ValueError, "check_every"),
    (dict(row_mass=torch.ones(5)), ValueError, "row_mass.*length 6"),
    (dict(col_mass=-torch.ones(5)), ValueError, "col_mass must be >= 0"),
    (dict(col_mass=torch.full((5,), math.nan)), ValueError, "col_mass contains NaN"),
    (dict(row_mass=torch.ones(6), col_mass=torch.ones(5)), ValueError, "same total"),
    (dict(row_mass=torch.zeros(6)), ValueError, "positive total"),
    (dict(init_g=torch.zeros(4)), ValueError, "init_g.*length 5"),
    (dict(init_g=torch.full((5,), math.nan)), ValueError, "init_g contains NaN"),
    (dict(backend="nope"), ValueError, "backend must be"),
    (dict(backend="cuda"), ValueError, "backend 'cuda'"),
])
def test_bad_sinkhorn_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nk.sinkhorn(S, **kwargs)
    with pytest.raises(exc, match=match):
        nk.sinkhorn_embeddings(X, Y, **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(row_targets=torch.zeros(6, dtype=torch.int32)), TypeError, "int64"),
    (dict(row_targets=torch.zeros(5, dtype=torch.int64)), ValueError, "length 6"),
    (dict(row_targets=torch.full((6,), 5)), ValueError, r"\[0, 5\)"),
    (dict(col_targets=torch.full((5,), -2)), ValueError, "got -2"),
    (dict(f=torch.zeros(6)), ValueError, "both f and g"),
    (dict(f=torch.zeros(6), g=torch.zeros(4)), ValueError, "g must be.*length 5"),
    (dict(f=torch.full((6,), math.inf), g=torch.zeros(5)), ValueError, r"f contains \+inf"),
    (dict(weights=(1.0, -1.0)), ValueError, "weights"),
    (dict(weights=1.0), TypeError, "weights"),
    (dict(n_iters=-1), ValueError, "n_iters"),
])
def test_bad_loss_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nk.ncl_loss(S, **kwargs)
    with pytest.raises(exc, match=match):
        nk.ncl_loss_embeddings(X, Y, **kwargs)


def test_bad_embeddings():
    with pytest.raises(ValueError, match="same embedding size"):
        nk.sinkhorn_embeddings(X, torch.zeros(5, 3))
    with pytest.raises(TypeError, match="same dtype"):
        nk.ncl_loss_embeddings(X, Y.double())
    # the message names the argument and what was found
    with pytest.raises(ValueError, match="y contains inf"):
        nk.sinkhorn_embeddings(X, torch.full((5, 4), math.inf))
    with pytest.raises(ValueError, match="x contains NaN"):
        nk.sinkhorn_embeddings(torch.full((6, 4), math.nan), Y)
    with pytest.raises(ValueError, match="2-D"):
        nk.ncl_loss_embeddings(X[0], Y)
    with pytest.raises(ValueError, match="same number of pairs"):
        nk.NCLLoss()(X, Y, 10.0)
    with pytest.raises(ValueError, match="mode"):
        nk.NCLLoss(mode="fast")
    with pytest.raises(TypeError, match="inplace_backward"):
        nk.ncl_loss(S, inplace_backward="yes")


def test_refusals_leave_the_callers_tensor_untouched():
    S0 = random_scores(6, 5, torch.float32, seed=1)
    work = S0.clone()
    for bad in (dict(f=torch.zeros(3)), dict(g=torch.full((5,), math.nan)),
                dict(scale=-2.0), dict(backend="nope")):
        with pytest.raises((ValueError, TypeError)):
            nk.apply_biases_(work, **bad)
        assert torch.equal(work, S0)
    needs_grad = S0.clone().requires_grad_()
    with pytest.raises(ValueError, match="non-differentiable"):
        nk.apply_biases_(needs_grad, 2.0)
    assert torch.equal(needs_grad.detach(), S0)
    for bad in (dict(row_targets=torch.full((6,), 9)), dict(weights=(-1.0, 1.0))):
        work = S0.clone().requires_grad_()
        with pytest.raises(ValueError):
            nk.ncl_loss(work, inplace_backward=True, **bad)
        assert torch.equal(work.detach(), S0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(scale=torch.tensor(-1.0)), ValueError, "scale must be finite and > 0"),
    (dict(scale=torch.tensor(math.nan)), ValueError, "scale must be finite"),
    (dict(scale=torch.ones(1)), TypeError, "scale"),
    (dict(row_mass=-torch.ones(6)), ValueError, "row_mass must be >= 0"),
    (dict(col_mass=torch.ones(4)), ValueError, "col_mass.*length 5"),
    (dict(row_mass=torch.ones(6), col_mass=torch.ones(5)), ValueError, "same total"),
    (dict(g=torch.zeros(5), f=torch.full((6,), math.nan)), ValueError, "f contains NaN"),
])
def test_bad_loss_values_are_refused_inside_the_ops(kwargs, exc, match):
    # these checks read data, so they run inside the custom ops; the messages are the same
    for call in (lambda: nk.ncl_loss(S, **kwargs), lambda: nk.ncl_loss_embeddings(X, Y, **kwargs)):
        with pytest.raises(exc, match=match):
            call()
    work = S.clone().requires_grad_()
    with pytest.raises(exc, match=match):
        nk.ncl_loss(work, inplace_backward=True, **kwargs)
    assert torch.equal(work.detach(), S)


def test_embedding_messages_name_the_callers_arguments():
    q, y = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="queries must have at least one row"):
        nk.retrieval.ranks(q[:0], y, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="bank and gallery must have the same embedding"):
        nk.retrieval.gallery_bias(torch.randn(3, 2), y)
    with pytest.raises(ValueError, match="gallery contains NaN"):
        nk.retrieval.topk(q, torch.full((5, 4), math.nan), 2)
    with pytest.raises(ValueError, match="text_features and video_features must have the same"):
        nk.NCLLoss()(torch.randn(4, 3), torch.randn(4, 5), 10.0)
