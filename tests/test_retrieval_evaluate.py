"""evaluate (none / ncl / qbnorm / qbnorm_dynamic / dsl) and the multi-caption helpers,
against the float64 oracle."""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref

from conftest import random_embeddings

R = nk.retrieval


def problem(seed=0, n_videos=41, dim=8):
    """A small multi-caption problem: 1-4 captions per video (one video has none in the
    bank sense only), queries near their video so the metrics are not all zero."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (n_videos,), generator=gen)
    c2v = torch.repeat_interleave(torch.arange(n_videos), counts)
    c2v = c2v[torch.randperm(c2v.numel(), generator=gen)]
    videos = torch.nn.functional.normalize(torch.randn(n_videos, dim, generator=gen), dim=1)
    captions = videos[c2v] + 0.9 * torch.randn(c2v.numel(), dim, generator=gen)
    captions = torch.nn.functional.normalize(captions, dim=1)
    bank, _ = random_embeddings(97, 1, dim, torch.float32, seed=seed + 1)
    bank = torch.nn.functional.normalize(bank + videos[torch.randint(0, n_videos, (97,),
                                                                     generator=gen)], dim=1)
    return (captions.double(), videos.double(), bank.double(), c2v)


def oracle_scores(method, q, y, bank, scale, beta):
    if method == "none":
        return ref.scores(q, y)
    if method == "ncl":
        return ref.scores(q, y, scale, ref.gallery_bias(bank, y, scale, n_iters=20, tol=None))
    if method == "qbnorm":
        return ref.scores(q, y, beta, ref.gallery_bias(bank, y, beta, method="qbnorm"))
    if method == "qbnorm_dynamic":
        return ref.qbnorm_dynamic_scores(q, y, bank, beta)
    return ref.dual_softmax_scores(ref.scores(q, y), beta)


@pytest.mark.parametrize("method", R.EVAL_METHODS)
@pytest.mark.parametrize("direction", ["t2v", "v2t"])
def test_evaluate_matches_oracle(method, direction):
    captions, videos, bank, c2v = problem()
    scale, beta = 20.0, 7.0
    if direction == "t2v":
        q, y, targets = captions, videos, R.text_to_video_targets(c2v)
    else:   # video-to-text: the bank plays against the captions, roles swapped
        q, y, targets = videos, captions, R.video_to_text_targets(c2v)
    ours = R.evaluate(q, y, targets, scale, method=method, bank=bank, beta=beta,
                      n_iters=20, tol=None, chunk=13)
    expect = ref.metrics(ref.ranks(oracle_scores(method, q, y, bank, scale, beta), targets))
    assert ours == pytest.approx(expect)
    assert 0 < ours["R@1"] < 100       # the problem is neither trivial nor hopeless


def test_evaluate_methods_differ_and_beta_defaults_to_scale():
    captions, videos, bank, c2v = problem(seed=3)
    t = R.text_to_video_targets(c2v)
    a = R.evaluate(captions, videos, t, 7.0, method="qbnorm", bank=bank)
    b = R.evaluate(captions, videos, t, 1.0, method="qbnorm", bank=bank, beta=7.0)
    assert a == b
    dsl = R.evaluate(captions, videos, t, 7.0, method="dsl")
    assert dsl == R.evaluate(captions, videos, t, 7.0, method="dsl", bank=bank)  # ignored


def test_qbnorm_dynamic_uses_both_branches():
    # the oracle test above is only meaningful if some queries take each branch
    captions, videos, bank, _ = problem()
    active = torch.unique((bank @ videos.T).argmax(1))
    use_is = torch.isin((captions @ videos.T).argmax(1), active)
    assert use_is.any() and not use_is.all()


def test_caption_targets_match_oracle():
    _, _, _, c2v = problem(seed=2)
    assert torch.equal(R.text_to_video_targets(c2v), ref.text_to_video_targets(c2v))
    assert torch.equal(R.video_to_text_targets(c2v), ref.video_to_text_targets(c2v, 41))
    # a video without captions gets a row of padding (ranks would reject it)
    v2t = R.video_to_text_targets(torch.tensor([0, 2, 0]), 4)
    assert v2t.tolist() == [[0, 2], [-1, -1], [1, -1], [-1, -1]]
    assert torch.equal(v2t, ref.video_to_text_targets(torch.tensor([0, 2, 0]), 4))


def test_evaluate_and_caption_bad_inputs():
    captions, videos, bank, c2v = problem()
    t = R.text_to_video_targets(c2v)
    with pytest.raises(ValueError, match="method"):
        R.evaluate(captions, videos, t, method="softmax")
    with pytest.raises(ValueError, match="bank"):
        R.evaluate(captions, videos, t, method="ncl")
    with pytest.raises(ValueError, match="embedding size"):
        R.evaluate(captions, videos, t, method="qbnorm", bank=bank[:, :3])
    with pytest.raises(ValueError, match="scale"):
        R.evaluate(captions, videos, t, method="dsl", beta=-1.0)
    with pytest.raises(TypeError, match="int64"):
        R.video_to_text_targets(c2v.int())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        R.video_to_text_targets(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="1-D"):
        R.text_to_video_targets(torch.zeros(2, 2, dtype=torch.int64))
