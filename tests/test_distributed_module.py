"""DistributedNCLLoss on 2 and 3 gloo ranks against NCLLoss on the concatenated batch:
pairs with uneven slices, and several captions per video with a queue over several steps."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ncl_kernels as nk

from conftest import rel_err

D, STEPS = 6, 3
PAIRS = {2: [5, 6], 3: [4, 1, 6]}     # uneven pair counts per rank
CAPTIONS, VIDEOS, K = 6, 3, 6          # per rank and step; K: a multiple of both


def _unit(gen, n):
    return torch.nn.functional.normalize(torch.randn(n, D, generator=gen,
                                                     dtype=torch.float64), dim=1)


def _pairs(world):
    gen = torch.Generator().manual_seed(11)
    n = sum(PAIRS[world])
    return _unit(gen, n), _unit(gen, n)


def _caption_steps(world):
    """Per step: every rank's captions, videos and local caption_to_video, concatenated."""
    gen = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(STEPS):
        c2v = [torch.randint(0, VIDEOS, (CAPTIONS,), generator=gen) for _ in range(world)]
        c2v[0][0] = -1                      # a caption without a loss term
        steps.append((_unit(gen, world * CAPTIONS), _unit(gen, world * VIDEOS), c2v))
    return steps


def _step(loss_fn, x, y, **kw):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(x, y, s, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


def _slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)   # one core per rank: tiny problems, a 2-core machine
    try:
        out = {}
        x, y = _pairs(world)
        mine = _slice(PAIRS[world], rank)
        for gradients in ("open_clip", "global"):
            loss = nk.distributed.DistributedNCLLoss(n_iters=5, gradients=gradients)
            out["pairs", gradients] = _step(loss, x[mine], y[mine])
        loss = nk.distributed.DistributedNCLLoss(n_iters=4, queue_size=K, gradients="global")
        for t, (text, video, c2v) in enumerate(_caption_steps(world)):
            out["captions", t] = _step(loss, text[_slice([CAPTIONS] * world, rank)],
                                       video[_slice([VIDEOS] * world, rank)],
                                       caption_to_video=c2v[rank])
        out["state"] = {k: v.clone() for k, v in loss.state_dict().items()}
        bad = torch.arange(CAPTIONS) % VIDEOS
        if rank == 1:
            bad[0] = VIDEOS                 # out of range on one rank: every rank raises
        try:
            loss(text[:CAPTIONS], video[:VIDEOS], 9.0, caption_to_video=bad)
            out["refusal"] = "none"
        except ValueError as exc:
            out["refusal"] = str(exc)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_matches_the_concatenated_batch(world, tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    x, y = _pairs(world)
    loss, dx, dy, ds = _step(nk.NCLLoss(n_iters=5, mode="streaming"), x, y)
    for gradients, factor in (("open_clip", world), ("global", 1)):
        for rank, res in enumerate(per_rank):
            l_r, dx_r, dy_r, ds_r = res["pairs", gradients]
            mine = _slice(PAIRS[world], rank)
            assert rel_err(l_r, loss) < 1e-10
            assert rel_err(dx_r, factor * dx[mine]) < 1e-10, (gradients, rank)
            assert rel_err(dy_r, factor * dy[mine]) < 1e-10, (gradients, rank)
            if gradients == "open_clip":   # the full d/dscale on every rank
                assert rel_err(ds_r, ds) < 1e-10
        if gradients == "global":          # shares that sum to it
            assert rel_err(sum(r["pairs", "global"][3] for r in per_rank), ds) < 1e-10

    # the queue kept per rank is NCLLoss's queue of world * K entries, step after step
    # the distributed module's semantics: queued entries are negatives, first-caption
    # targets, no drift terms
    single = nk.NCLLoss(n_iters=4, queue_size=world * K, mode="streaming",
                        queue_as_negatives=True, positives="first", bias_gradient=False,
                        offset_penalty=0.0)
    for t, (text, video, c2v) in enumerate(_caption_steps(world)):
        glob = torch.cat([c + (c >= 0) * VIDEOS * r for r, c in enumerate(c2v)])
        loss, dx, dy, ds = _step(single, text, video, caption_to_video=glob)
        for rank, res in enumerate(per_rank):
            l_r, dx_r, dy_r, _ = res["captions", t]
            assert rel_err(l_r, loss) < 1e-10, (t, rank)
            assert rel_err(dx_r, dx[_slice([CAPTIONS] * world, rank)]) < 1e-10, (t, rank)
            assert rel_err(dy_r, dy[_slice([VIDEOS] * world, rank)]) < 1e-10, (t, rank)
        assert rel_err(sum(r["captions", t][3] for r in per_rank), ds) < 1e-10, t
    for rank, res in enumerate(per_rank):
        assert res["state"]["queue_text"].shape == (K, D)    # each rank: its own K
        expect = "caption_to_video" if rank == 1 else "rank 1 refused its input"
        assert expect in res["refusal"], (rank, res["refusal"])


def test_options():
    with pytest.raises(ValueError, match="gradients"):
        nk.distributed.DistributedNCLLoss(gradients="mean")
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        nk.distributed.DistributedNCLLoss()(x, x, 1.0)
    assert "gradients='open_clip'" in repr(nk.distributed.DistributedNCLLoss())
