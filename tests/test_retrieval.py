"""ncl_kernels.retrieval against the oracle: biases, streaming ranks and top-k, metrics."""

import subprocess
import sys
import textwrap

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import ncl_kernels as nk
import python_ref as ref
from ncl_kernels.retrieval import _stream
from ncl_kernels.retrieval._scorers import LinearScorer

from conftest import PEAK_RSS_CODE, ROOT, STORAGE_DTYPES, child_env, random_embeddings, rel_err

R = nk.retrieval
SHAPES = [(1, 1), (1, 7), (7, 1), (7, 67), (67, 7), (67, 1031)]


def integer_embeddings(n, m, d, dtype, *, seed=0, strided=False):
    """Small integers: every score is exact in float32 (and representable in fp16/bf16),
    so ranks must equal the float64 oracle bit for bit, ties included (there are many)."""
    gen = torch.Generator().manual_seed(seed)
    width = d + 5 if strided else d     # strided: a view of a wider matrix
    x = torch.randint(-2, 3, (n, width), generator=gen).to(dtype)[:, :d]
    y = torch.randint(-2, 3, (m, width), generator=gen).to(dtype)[:, :d]
    return x, y


def random_targets(n, m, p=None, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if p is None:
        return torch.randint(0, m, (n,), generator=gen)
    t = torch.randint(0, m, (n, p), generator=gen)
    t[1::2, 1:] = -1            # odd rows: one positive, the rest padding
    return t


@pytest.mark.parametrize("method", ["ncl", "qbnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gallery_bias_matches_oracle(method, dtype, backend, small_chunks):
    bank, gallery = random_embeddings(53, 29, 12, dtype, seed=1)
    ours = R.gallery_bias(bank, gallery, 20.0, method=method, n_iters=10, tol=None,
                          backend=backend)
    r64 = ref.gallery_bias(bank, gallery, 20.0, method=method, n_iters=10, tol=None)
    assert ours.shape == (29,)
    assert rel_err(ours, r64) < (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_ranks_exact_ties_match_oracle(dtype, n, m, strided):
    q, gallery = integer_embeddings(n, m, 5, dtype, seed=n * m, strided=strided)
    bias = torch.randint(-3, 4, (m,), generator=torch.Generator().manual_seed(m)).float()
    if m > 2:
        bias[::3] = float("-inf")            # removed items, some of them positives
    bias = bias.to(torch.float64 if dtype == torch.float64 else torch.float32)
    targets = random_targets(n, m, 3, seed=m)
    dense = ref.scores(q, gallery, 2.0, bias)     # scale 2: exact too
    expect = ref.ranks(dense, targets)
    for chunk in (None, 1, 7, 64):
        ours = R.ranks(q, gallery, targets, 2.0, bias=bias, chunk=chunk)
        assert ours.dtype == torch.int64 and torch.equal(ours, expect), chunk


def test_ranks_exact_ties_count_against_the_query():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    targets = torch.tensor([1, 2, 0])
    for chunk in (1, 2, 3, None):
        ours = R.ranks(q, gallery, targets, chunk=chunk)
        assert ours.tolist() == [2, 2, 4]
        assert torch.equal(ours, ref.ranks(ref.scores(q, gallery), targets))


@pytest.mark.parametrize("chunk", [None, 1, 4, 7, 100])
def test_ranks_and_topk_stream_like_dense_float64(chunk):
    q, gallery = random_embeddings(37, 23, 8, torch.float64, seed=2)
    bias = torch.randn(23, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 23, (37,), generator=torch.Generator().manual_seed(1))
    ours = R.ranks(q, gallery, targets, 5.0, bias=bias, chunk=chunk)
    dense = ref.scores(q, gallery, 5.0, bias)
    assert torch.equal(ours, ref.ranks(dense, targets))
    values, indices = R.topk(q, gallery, 6, 5.0, bias=bias, chunk=chunk)
    expect_v, expect_i = dense.topk(6, dim=1)
    torch.testing.assert_close(values, expect_v)
    assert torch.equal(indices, expect_i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ranks_random_low_precision_against_oracle(dtype):
    # float32 arithmetic may round a near-tie either way; away from near-ties the rank is
    # the oracle's, and the one-pass and two-pass methods agree everywhere, bit for bit
    q, gallery = random_embeddings(67, 1031, 16, dtype, seed=4)
    targets = random_targets(67, 1031, 2, seed=4)
    dense = ref.scores(q, gallery, 20.0)
    expect = ref.ranks(dense, targets)
    ours = R.ranks(q, gallery, targets, 20.0, chunk=97)
    tc = targets.clamp(min=0)
    gap = (dense[:, None, :] - dense.gather(1, tc)[:, :, None]).abs()
    gap[torch.arange(67)[:, None], torch.arange(2)[None, :], tc] = float("inf")
    clear = gap.amin((1, 2)) > 1e-4
    assert clear.sum() > 50
    assert torch.equal(ours[clear], expect[clear])
    scorer = LinearScorer(q, gallery, 20.0)
    assert torch.equal(ours, _stream.rank_two_pass(scorer, targets, 97))


def test_ranks_several_positives_take_the_best():
    q, gallery = random_embeddings(15, 40, 6, torch.float64, seed=3)
    targets = torch.randint(0, 40, (15, 3), generator=torch.Generator().manual_seed(2))
    targets[::2, 2] = -1
    for chunk in (None, 9):
        ours = R.ranks(q, gallery, targets, 3.0, chunk=chunk)
        assert torch.equal(ours, ref.ranks(ref.scores(q, gallery, 3.0), targets))


def test_ranks_recount_when_the_prepass_disagrees(monkeypatch):
    # A BLAS whose product depends on the shape would make the pre-pass score differ from
    # the block's: those rows must be recounted, and the answer must not change.
    q, gallery = integer_embeddings(31, 50, 4, torch.float32, seed=5)
    targets = random_targets(31, 50, 2, seed=5)
    expect = ref.ranks(ref.scores(q, gallery), targets)
    honest = _stream._positive_scores

    def off_by_one_ulp(scorer, T):
        out = honest(scorer, T)
        out[::3] = torch.nextafter(out[::3], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(_stream, "_positive_scores", off_by_one_ulp)
    ranks, recounted = _stream.rank_one_pass(LinearScorer(q, gallery, 1.0), targets, 7)
    assert recounted == len(range(0, 31, 3))
    assert torch.equal(ranks, expect)
    assert torch.equal(R.ranks(q, gallery, targets, chunk=7), expect)


@pytest.mark.parametrize("n", [1, 2, 7, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_ranks_prepass_matches_the_blocks_here(n, with_bias):
    # not a correctness requirement (a mismatch is recounted), but the one-pass speed
    # depends on it: on this CPU's BLAS no row should need the recount
    q, gallery = random_embeddings(n, 5000, 64, torch.float32, seed=6)
    bias = torch.randn(5000, generator=torch.Generator().manual_seed(6)) if with_bias else None
    targets = random_targets(n, 5000, 2, seed=6)
    _, recounted = _stream.rank_one_pass(LinearScorer(q, gallery, 20.0, bias), targets, 1024)
    assert recounted == 0


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (7, 67), (67, 1031)])
def test_topk_matches_oracle(dtype, n, m):
    q, gallery = random_embeddings(n, m, 8, dtype, seed=7)
    q, gallery = q[:, :8], torch.cat([gallery, gallery], 1)[:, :8]   # strided gallery
    bias = torch.randn(m, generator=torch.Generator().manual_seed(7)).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    k = min(m, 5)
    dense = ref.scores(q, gallery, 3.0, bias)
    for chunk in (None, 3, 64):
        values, indices = R.topk(q, gallery, k, 3.0, bias=bias, chunk=chunk)
        assert values.shape == indices.shape == (n, k)
        expect = dense.topk(k, dim=1).values
        assert rel_err(values, expect) < (1e-12 if dtype == torch.float64 else 1e-6)
        # the indices hold exactly the values reported (no tie is needed for this)
        torch.testing.assert_close(dense.gather(1, indices), expect.to(torch.float64),
                                   rtol=1e-6, atol=1e-6)
        assert (values[:, :-1] >= values[:, 1:]).all()


def test_metrics_match_oracle_and_hand_numbers():
    ranks = torch.tensor([1, 2, 5, 11, 60, 1])
    m = R.metrics(ranks)
    assert m == ref.metrics(ranks)
    assert m["R@1"] == pytest.approx(100 * 2 / 6) and m["R@5"] == pytest.approx(100 * 4 / 6)
    assert m["R@10"] == pytest.approx(100 * 4 / 6) and m["R@50"] == pytest.approx(100 * 5 / 6)
    assert m["MdR"] == 3.5 and m["MnR"] == pytest.approx(80 / 6)
    table = R.format_metrics({"none": m, "ncl": m})
    lines = table.splitlines()
    assert len(lines) == 3 and "R@1" in lines[0] and lines[2].startswith("ncl")
    assert "33.33" in lines[1]


def test_retrieval_bad_inputs():
    q, gallery = random_embeddings(4, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="method"):
        R.gallery_bias(q, gallery, method="nope")
    with pytest.raises(TypeError, match="int64"):
        R.ranks(q, gallery, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        R.ranks(q, gallery, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="shape"):
        R.ranks(q, gallery, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="at least one target"):
        R.ranks(q, gallery, torch.tensor([[0, 1], [-1, -1], [2, -1], [3, 4]]))
    with pytest.raises(ValueError, match="bias"):
        R.ranks(q, gallery, torch.tensor([0, 1, 2, 3]), bias=torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        R.ranks(q, gallery, torch.tensor([0, 1, 2, 3]), bias=torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match="scale"):
        R.ranks(q, gallery, torch.tensor([0, 1, 2, 3]), 0.0)
    with pytest.raises(ValueError, match="finite"):
        R.ranks(q.clone().fill_(float("nan")), gallery, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):   # inf - inf inside the product
        R.ranks(torch.full((2, 3), 1e30), torch.tensor([[1e30, -1e30, 0.0]] * 4),
                torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="k must be"):
        R.topk(q, gallery, 6)
    with pytest.raises(ValueError, match="chunk"):
        R.topk(q, gallery, 2, chunk=0)
    with pytest.raises(ValueError, match="chunk"):
        R.ranks(q, gallery, torch.tensor([0, 1, 2, 3]), chunk=True)
    with pytest.raises(ValueError, match="ranks start at 1"):
        R.metrics(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        R.metrics(torch.tensor([1.0, 2.0]))


# Q = 512 queries, M = 131072 items: a float32 score matrix would be 256 MiB; a block is
# 16 MiB (the default chunk) plus a 4 MiB mask.
MEMORY_CODE = textwrap.dedent("""
    import torch, ncl_kernels as nk
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(512, 16), dim=1)
    y = torch.nn.functional.normalize(torch.randn(131072, 16), dim=1)
    b = torch.randn(131072) * 0.1
    t = torch.randint(0, 131072, (512, 2))
    nk.retrieval.ranks(q[:8], y[:4096], t[:8] % 4096, 20.0, bias=b[:4096])   # warm up
    before = reset_peak()   # KiB
    nk.retrieval.ranks(q, y, t, 20.0, bias=b)
    nk.retrieval.topk(q, y, 10, 20.0, bias=b)
    after = peak()
    print((after - before) / 1024)
""")


@pytest.mark.slow
def test_ranks_and_topk_peak_memory():
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_CODE + MEMORY_CODE],
                          capture_output=True, text=True,
                          check=False,
                          cwd=str(ROOT / "tests"), timeout=600,
                          env=child_env(MALLOC_MMAP_THRESHOLD_="1048576"))
    assert done.returncode == 0, done.stderr
    growth_mib = float(done.stdout.strip())
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), m=st.integers(1, 60), p=st.integers(1, 3),
       chunk=st.integers(1, 70), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 4.0]))
def test_ranks_property_exact_integers(n, m, p, chunk, seed, scale):
    # many exact ties (entries in -1..1, D = 3), removed items, several positives
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (n, 3), generator=gen).float()
    y = torch.randint(-1, 2, (m, 3), generator=gen).float()
    bias = torch.randint(-1, 2, (m,), generator=gen).float()
    bias[torch.rand(m, generator=gen) < 0.2] = float("-inf")
    targets = torch.randint(-1, m, (n, p), generator=gen)
    targets[:, 0] = targets[:, 0].clamp(min=0)
    expect = ref.ranks(ref.scores(q, y, scale, bias), targets)
    assert torch.equal(R.ranks(q, y, targets, scale, bias=bias, chunk=chunk), expect)


def test_default_blocks_follow_the_device():
    from ncl_kernels.retrieval import _stream
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _stream.default_chunk(1024, 1 << 30, None, cpu) == (1 << 22) // 1024
    assert _stream.default_chunk(1024, 1 << 30, None, cuda) == (1 << 26) // 1024
    assert _stream.default_chunk(1024, 100, None, cuda) == 100       # never past the gallery
    assert _stream.default_chunk(8, 1 << 30, 77, cuda) == 77         # a chunk given wins


def test_metrics_at_other_levels():
    ranks = torch.tensor([1, 3, 7, 120, 2])
    m = R.metrics(ranks, ks=(1, 2, 100, 200))
    assert list(m) == ["R@1", "R@2", "R@100", "R@200", "MdR", "MnR"]
    assert (m["R@1"], m["R@2"], m["R@100"], m["R@200"]) == (20.0, 40.0, 80.0, 100.0)
    assert R.metrics(ranks) == R.metrics(ranks, ks=R.RECALL_AT)
    assert "R@100" in R.format_metrics({"x": m}).splitlines()[0]
    for bad in ((), (0,), (1.5,), "15"):
        with pytest.raises((ValueError, TypeError), match="ks"):
            R.metrics(ranks, ks=bad)
