"""The NCL loss, forward + backward: dense (``ncl_loss``) and streaming
(``ncl_loss_embeddings``), with a learnable scale (a tensor that requires grad), 4
Sinkhorn iterations (the default).

Work counted (the same for every implementation of an op):
* dense: SPEC's pass accounting, ``2 * ITERS + 1`` reads of S in the forward (Sinkhorn and
  the closing row pass) and one read plus one write in the backward: ``(2 * ITERS + 3)``
  N M elements, against the read roof.
* streaming: ``2 * ITERS + 1`` products in the forward, then one to recompute S and two for
  ``dX``/``dY`` in the backward: ``(2 * ITERS + 4) * 2 N M D`` flops, against the matmul
  roof.

Peers: CLIP's loss plus Sinkhorn biases written the obvious way (eager autograd), its
``torch.compile``, and on the GPU inf-cl's tiled InfoNCE against ours at ``n_iters=0``
(where NCL is CLIP's loss).
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
NS, D = SIZE.loss_stream, SIZE.dim
ITERS = 4
ORACLE = N * N <= ORACLE_MAX_ELEMS
ORACLE_S = NS * NS <= ORACLE_MAX_ELEMS
PEERS = ["eager", "compile"]


def _reference(loss_fn, leaves, scale):
    """Loss and gradients of ``loss_fn(*leaves, scale)``: the oracle or a float32 peer."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    scale = scale.detach().clone().requires_grad_()
    loss = loss_fn(*leaves, scale)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves] + [scale.grad]


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d)[6:])
def dense(request):
    dtype = request.param
    S = cosine_scores(N, dtype)
    scale = torch.tensor(SCALE, device=DEVICE)
    if ORACLE:
        expected = _reference(lambda s_, c: ref.ncl_loss(s_, c, n_iters=ITERS), [S], scale)
    else:
        expected = _reference(lambda s_, c: peers.clip_ncl_loss(s_, c, ITERS), [S], scale)
    return dtype, S, scale, expected


@pytest.fixture(scope="module", params=STREAM_DTYPES, ids=lambda d: str(d)[6:])
def stream(request):
    dtype = request.param
    x, y = unit_rows(NS, D, 2, dtype).to(DEVICE), unit_rows(NS, D, 3, dtype).to(DEVICE)
    scale = torch.tensor(SCALE, device=DEVICE)
    fn = (lambda x_, y_, c: ref.ncl_loss_embeddings(x_, y_, c, n_iters=ITERS)) if ORACLE_S \
        else (lambda x_, y_, c: peers.clip_ncl_loss_embeddings(x_, y_, c, ITERS))
    return dtype, x, y, scale, _reference(fn, [x, y], scale)


def _check(names, got, expected, dtype, oracle):
    return "; ".join(expect_close(n, a, b, dtype, oracle)
                     for n, a, b in zip(names, got, expected))


@pytest.mark.parametrize("impl", ours_backends(auto=True)
                         + [b + "-inplace" for b in ours_backends()] + PEERS)
def test_ncl_loss_fwd_bwd(benchmark, roofs, dense, impl):
    dtype, S0, scale0, expected = dense
    inplace = impl.endswith("-inplace")
    state = {}

    def setup():
        # fresh leaves each round (not timed): the in-place backward consumes its scores
        state["S"] = (S0.clone() if inplace else S0).detach().requires_grad_()
        state["scale"] = scale0.detach().clone().requires_grad_()

    if impl == "compile":
        setup()
        peers.clip_ncl_loss_compiled(state["S"], state["scale"], ITERS).backward()

    def fn():
        S, scale = state["S"], state["scale"]
        if impl == "eager":
            loss = peers.clip_ncl_loss(S, scale, ITERS)
        elif impl == "compile":
            loss = peers.clip_ncl_loss_compiled(S, scale, ITERS)
        else:
            loss = nk.ncl_loss(S, scale, n_iters=ITERS, backend=impl.replace("-inplace", ""),
                               inplace_backward=inplace)
        loss.backward()
        return loss.detach(), S.grad, scale.grad

    run_case(benchmark, roofs, op="ncl_loss_fwd_bwd", backend=impl, ours=impl not in PEERS,
             fn=fn, setup=setup,
             check=lambda out: _check(["loss", "dS", "dscale"], out, expected, dtype, ORACLE),
             shape=S0.shape, dtype=dtype,
             bytes_moved=(2 * ITERS + 3) * S0.numel() * S0.element_size(), roof="read",
             exps=(2 * ITERS + 3) * S0.numel(), note=f"n_iters={ITERS}, tensor scale with grad")


@pytest.mark.parametrize("impl", with_streaming(ours_backends(auto=True)) + PEERS)
def test_ncl_loss_embeddings_fwd_bwd(benchmark, roofs, stream, impl):
    dtype, x0, y0, scale0, expected = stream
    state = {}

    def setup():
        state["x"] = x0.detach().requires_grad_()
        state["y"] = y0.detach().requires_grad_()
        state["scale"] = scale0.detach().clone().requires_grad_()

    if impl == "compile":
        setup()
        peers.clip_ncl_loss_embeddings_compiled(state["x"], state["y"], state["scale"],
                                                ITERS).backward()

    def fn():
        x, y, scale = state["x"], state["y"], state["scale"]
        if impl == "eager":
            loss = peers.clip_ncl_loss_embeddings(x, y, scale, ITERS)
        elif impl == "compile":
            loss = peers.clip_ncl_loss_embeddings_compiled(x, y, scale, ITERS)
        else:
            backend, materialize = split_impl(impl)
            loss = nk.ncl_loss_embeddings(x, y, scale, n_iters=ITERS, backend=backend,
                                          materialize=materialize)
        loss.backward()
        return loss.detach(), x.grad, y.grad, scale.grad

    run_case(benchmark, roofs, op="ncl_loss_embeddings_fwd_bwd", backend=impl,
             ours=impl not in PEERS, fn=fn, setup=setup,
             check=lambda out: _check(["loss", "dX", "dY", "dscale"], out, expected, dtype,
                                      ORACLE_S),
             shape=(NS, NS, D), dtype=dtype, flops=(2 * ITERS + 4) * 2.0 * NS * NS * D,
             roof="matmul", note=f"n_iters={ITERS}, tensor scale with grad")


@pytest.mark.parametrize("impl", ours_backends(auto=True) + ["inf-cl"])
def test_clip_loss_embeddings_fwd_bwd(benchmark, roofs, stream, impl):
    """CLIP's symmetric InfoNCE (NCL with ``n_iters=0``) from embeddings: vs inf-cl (GPU)."""
    dtype, x0, y0, scale0, _ = stream
    if impl == "inf-cl":
        if not ON_GPU:
            pytest.skip("inf-cl runs on CUDA only (Triton kernels)")
        pytest.importorskip("inf_cl", reason="inf-cl is not installed (pip install inf-cl)")
    expected = _reference(lambda x_, y_, c: ref.ncl_loss_embeddings(x_, y_, c, n_iters=0)
                          if ORACLE_S else peers.clip_ncl_loss_embeddings(x_, y_, c, 0),
                          [x0, y0], scale0)
    state = {}

    def setup():
        state["x"] = x0.detach().requires_grad_()
        state["y"] = y0.detach().requires_grad_()
        state["scale"] = scale0.detach().clone().requires_grad_()

    def fn():
        x, y, scale = state["x"], state["y"], state["scale"]
        if impl == "inf-cl":
            loss = peers.inf_cl_clip_loss(x, y, scale)
        else:
            loss = nk.ncl_loss_embeddings(x, y, scale, n_iters=0, backend=impl)
        loss.backward()
        return loss.detach(), x.grad, y.grad, scale.grad

    run_case(benchmark, roofs, op="clip_loss_embeddings_fwd_bwd", backend=impl,
             ours=impl != "inf-cl", fn=fn, setup=setup,
             check=lambda out: _check(["loss", "dX", "dY", "dscale"], out, expected, dtype,
                                      ORACLE_S),
             shape=(NS, NS, D), dtype=dtype, flops=5 * 2.0 * NS * NS * D, roof="matmul",
             note="n_iters=0 (CLIP's symmetric InfoNCE)")
