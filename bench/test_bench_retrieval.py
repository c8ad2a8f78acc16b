"""Retrieval at test time: ``retrieval.gallery_bias`` and ``retrieval.ranks``.

gallery_bias (NCL): Sinkhorn on ``scale * bank @ gallery.T`` (K x M), streamed; work
``2 * ITERS`` products of ``2 K M D`` flops. Peer: materialize ``bank @ gallery.T`` and run
the eager loop (and POT's ``sinkhorn_log`` on that matrix).

ranks: one query x gallery product of ``2 Q M D`` flops (ours streams over gallery chunks
and computes each block twice, once to read the positives' scores and once to count, so
its roof ratio shows that cost). Peer: the whole Q x M score matrix at once.
"""

import pytest
import torch

import python_ref as ref
from ncl_kernels import retrieval

import peers
from harness import (
    DEVICE,
    ORACLE_MAX_ELEMS,
    SCALE,
    SIZE,
    STREAM_DTYPES,
    expect_close,
    ours_backends,
    run_case,
    split_impl,
    unit_rows,
    with_streaming,
)

K, M, Q, D = SIZE.bank, SIZE.gallery, SIZE.queries, SIZE.dim
ITERS = 10
ORACLE = K * M <= ORACLE_MAX_ELEMS
ORACLE_RANKS = Q * M <= ORACLE_MAX_ELEMS


@pytest.fixture(scope="module", params=STREAM_DTYPES, ids=lambda d: str(d)[6:])
def bank_gallery(request):
    dtype = request.param
    bank, gallery = unit_rows(K, D, 5, dtype).to(DEVICE), unit_rows(M, D, 6, dtype).to(DEVICE)
    if ORACLE:
        expected = ref.gallery_bias(bank, gallery, SCALE, n_iters=ITERS, tol=None)
    else:
        expected = peers.sinkhorn_embeddings_eager(bank, gallery, SCALE, ITERS)[1]
    return dtype, bank, gallery, expected


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("impl", with_streaming(ours_backends(auto=True)) + ["eager", "pot"])
def test_gallery_bias(benchmark, roofs, bank_gallery, impl):
    dtype, bank, gallery, expected = bank_gallery
    if impl == "eager":
        fn = lambda: peers.sinkhorn_embeddings_eager(bank, gallery, SCALE, ITERS)[1]
        check = lambda g: expect_close("g", g, expected, dtype, ORACLE)
    elif impl == "pot":
        pytest.importorskip("ot", reason="POT is not installed (pip install pot)")
        fn = lambda: peers.sinkhorn_pot(bank.float() @ gallery.float().T, SCALE, ITERS)
        # POT's column-first order is our order on the transposed problem (see
        # test_bench_sinkhorn): its log_v after ITERS iterations is that problem's f
        S_t = gallery.double() @ bank.double().T
        exp_v = ref.sinkhorn(S_t, SCALE, n_iters=ITERS, tol=None,
                             row_mass=torch.full((M,), K / M, dtype=torch.float64,
                                                 device=DEVICE),
                             col_mass=torch.ones(K, dtype=torch.float64, device=DEVICE)).f
        del S_t
        check = lambda out: expect_close("log_v", out[1], exp_v, dtype, ORACLE)
    else:
        backend, materialize = split_impl(impl)
        fn = lambda: retrieval.gallery_bias(bank, gallery, SCALE, n_iters=ITERS, tol=None,
                                            backend=backend, materialize=materialize)
        check = lambda g: expect_close("g", g, expected, dtype, ORACLE)
    run_case(benchmark, roofs, op="gallery_bias", backend=impl,
             ours=impl not in ("eager", "pot"), fn=fn, check=check, shape=(K, M, D),
             dtype=dtype, flops=2 * ITERS * 2.0 * K * M * D, roof="matmul",
             note=f"method='ncl', {ITERS} iterations, tol=None")


@pytest.fixture(scope="module", params=STREAM_DTYPES, ids=lambda d: str(d)[6:])
def queries_gallery(request):
    dtype = request.param
    queries, gallery = unit_rows(Q, D, 7, dtype), unit_rows(M, D, 8, dtype)
    # queries near their targets so the ranks spread over 1..M rather than all ~M/2
    targets = torch.randint(0, M, (Q,), generator=torch.Generator().manual_seed(9))
    queries = torch.nn.functional.normalize(queries.float() + 0.1 * gallery[targets].float()
                                            * D ** 0.5, dim=1).to(dtype)
    queries, gallery, targets = queries.to(DEVICE), gallery.to(DEVICE), targets.to(DEVICE)
    if ORACLE_RANKS:
        expected = ref.ranks(ref.scores(queries, gallery, SCALE), targets)
    else:
        expected = peers.ranks_dense(queries, gallery, targets, SCALE)
    return dtype, queries, gallery, targets, expected


def _check_ranks(got, expected):
    # float32 scores may order a near-tie differently from the float64 oracle: allow a
    # few such queries, never a systematic difference
    differ = int((got.to(expected.device) != expected).sum())
    assert differ <= max(1, expected.numel() // 500), f"{differ} ranks differ from the oracle"
    return f"{differ} of {expected.numel()} ranks differ (near-ties in float32)"


@pytest.mark.parametrize("impl", ["default", "dense"])
def test_ranks(benchmark, roofs, queries_gallery, impl):
    dtype, queries, gallery, targets, expected = queries_gallery
    if impl == "dense":
        fn = lambda: peers.ranks_dense(queries, gallery, targets, SCALE)
    else:
        fn = lambda: retrieval.ranks(queries, gallery, targets, SCALE)
    run_case(benchmark, roofs, op="ranks", backend=impl, ours=impl == "default", fn=fn,
             check=lambda got: _check_ranks(got, expected), shape=(Q, M, D), dtype=dtype,
             flops=2.0 * Q * M * D, roof="matmul", note="no bias, one target per query")
