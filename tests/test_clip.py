"""NCLClipLoss against open_clip's ClipLoss (and ClipLoss's math written out) on 1, 2 and
3 gloo ranks, in each of ClipLoss's four distributed modes."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ncl_kernels as nk

from clip_reference import open_clip_loss_class, references
from conftest import rel_err

N, D = 5, 6          # pairs per rank
MODES = list(itertools.product([False, True], [False, True]))   # (local_loss, gather_with_grad)


def _features(world, seed=3):
    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    img = unit(torch.randn(world * N, D, generator=gen, dtype=torch.float64), dim=1)
    txt = unit(torch.randn(world * N, D, generator=gen, dtype=torch.float64), dim=1)
    return img, txt


def _step(loss_fn, img, txt, bias=True):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor([-2.5], dtype=torch.float64, requires_grad=True) if bias else None
    out = loss_fn(img, txt, scale, logit_bias, output_dict=True)["contrastive_loss"]
    out.backward()
    return out.detach(), img.grad, txt.grad, scale.grad


def _close(ours, ref, tol=1e-10):
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < tol, (a, b)


def test_references_agree():
    """The written-out math is ClipLoss (where open_clip is here to say so)."""
    oc = open_clip_loss_class()
    if oc is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch)")
    img, txt = _features(1)
    _close(_step(references()["hand_written"](), img, txt), _step(oc(), img, txt), 1e-14)


@pytest.mark.parametrize("ref", sorted(references()))
@pytest.mark.parametrize("local_loss,gather_with_grad", MODES)
def test_one_process_is_clip_loss(ref, local_loss, gather_with_grad, backend):
    img, txt = _features(1)
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True)
    ours = _step(nk.NCLClipLoss(**kw, n_iters=0, backend=backend), img, txt)
    _close(ours, _step(references()[ref](**kw), img, txt))


def test_interface():
    img, txt = _features(1)
    loss = nk.NCLClipLoss()
    assert loss(img, txt, 10.0).dim() == 0
    assert set(loss(img, txt, 10.0, output_dict=True)) == {"contrastive_loss"}
    # the bias changes nothing, even with the Sinkhorn biases, and gets a zero gradient
    a, b = _step(loss, img, txt, bias=False), _step(loss, img, txt, bias=True)
    _close(a, b, 1e-12)
    bias = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss(img, txt, 10.0, bias).backward()
    assert bias.grad == 0
    # n_iters > 0 is the NCL loss of the batch
    _close([loss(img, txt, 10.0)], [nk.ncl_loss_embeddings(img, txt, 10.0, n_iters=20)], 1e-12)


def test_refusals():
    img, txt = _features(1)
    with pytest.raises(ValueError, match="Horovod"):
        nk.NCLClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank"):
        nk.NCLClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="local_loss"):
        nk.NCLClipLoss(local_loss=True, world_size=2, queue_size=8)
    with pytest.raises(ValueError, match="same number of pairs"):
        nk.NCLClipLoss()(img, txt[:3], 10.0)
    bad = img.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="image_features contains NaN"):
        nk.NCLClipLoss()(bad, txt, 10.0)
    with pytest.raises(ValueError, match="logit_bias"):
        nk.NCLClipLoss()(img, txt, 10.0, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        nk.NCLClipLoss()(img, txt, 10.0, float("inf"))
    with pytest.raises(RuntimeError, match="init_process_group"):
        nk.NCLClipLoss(world_size=2)(img, txt, 10.0)


def _worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)   # one core per rank: tiny problems, a 2-core machine
    try:
        img, txt = _features(world)
        mine = slice(rank * N, (rank + 1) * N)
        results = {}
        for (local_loss, gather_with_grad), (name, ref) in itertools.product(
                MODES, references().items()):
            kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad,
                      cache_labels=True, rank=rank, world_size=world)
            results[local_loss, gather_with_grad, name] = (
                _step(nk.NCLClipLoss(**kw, n_iters=0), img[mine], txt[mine]),
                _step(ref(**kw), img[mine], txt[mine]))
        for local_loss in (False, True):  # with the biases: the global problem's
            kw = dict(local_loss=local_loss, rank=rank, world_size=world)
            results["ncl", local_loss] = _step(nk.NCLClipLoss(**kw, n_iters=4),
                                               img[mine], txt[mine])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_clip_loss(world, tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    img, txt = _features(world)
    whole = _step(nk.NCLClipLoss(n_iters=4), img, txt)
    for rank, results in enumerate(per_rank):
        for key, value in results.items():
            if key[0] != "ncl":
                _close(*value)
        # the global problem's biases: the non-local loss is the one-process loss of the
        # concatenated batch, with ClipLoss's gradient convention (gather_with_grad=False)
        mine = slice(rank * N, (rank + 1) * N)
        loss, g_img, g_txt, g_scale = results["ncl", False]
        _close([loss, g_img, g_txt, g_scale],
               [whole[0], whole[1][mine], whole[2][mine], whole[3]])
    # local losses: their mean over ranks is the global loss (equal batch sizes)
    mean_local = sum(r["ncl", True][0] for r in per_rank) / world
    assert rel_err(mean_local, whole[0]) < 1e-10
