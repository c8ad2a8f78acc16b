"""Data-parallel training with DistributedDataParallel and DistributedNCLLoss (CPU, gloo).

Each rank encodes its own slice of the batch; ``DistributedNCLLoss`` computes the NCL loss
of the *global* batch (every rank's captions against every rank's videos, biases from
Sinkhorn over all of them), with a queue of earlier embeddings kept per rank. Its default
gradient convention is open_clip's (``gather_with_grad=True``): DDP averages the ranks'
gradients, and that average is the exact gradient of the global loss, so the loss is used
as is, with no factor of world_size.

    python examples/ddp_train.py [--world 2] [--steps 40]

The script checks that every rank saw the same loss and that the replicas stayed equal.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ncl_kernels as nk

CAPTIONS_PER_VIDEO = 2


class Towers(nn.Module):
    def __init__(self, text_dim=24, video_dim=40, embed_dim=16):
        super().__init__()
        self.text = nn.Linear(text_dim, embed_dim)
        self.video = nn.Linear(video_dim, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(2.3))

    def forward(self, text, video):
        unit = nn.functional.normalize
        return unit(self.text(text), dim=1), unit(self.video(video), dim=1), self.log_scale.exp()


def batches(rank, steps, videos_per_rank=16):
    """This rank's batches: videos and two captions each (caption_to_video, local)."""
    gen = torch.Generator().manual_seed(100 + rank)
    mix_t = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    mix_v = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        z = torch.randn(videos_per_rank, 8, generator=gen)
        c2v = torch.arange(videos_per_rank).repeat_interleave(CAPTIONS_PER_VIDEO)
        text = z[c2v] @ mix_t + 0.3 * torch.randn(c2v.numel(), 24, generator=gen)
        video = torch.tanh(z @ mix_v)
        yield text, video, c2v


def worker(rank, world, init, steps, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)                       # one core per rank (README, "Threads")
    try:
        torch.manual_seed(0)                       # the same initial weights everywhere
        model = DDP(Towers())
        loss_fn = nk.distributed.DistributedNCLLoss(n_iters=20, queue_size=64)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        for step, (text, video, c2v) in enumerate(batches(rank, steps)):
            t, v, scale = model(text, video)
            loss = loss_fn(t, v, scale, caption_to_video=c2v)
            opt.zero_grad()
            loss.backward()                        # DDP averages: the exact global gradient
            opt.step()
            if rank == 0 and step % 10 == 0:
                print(f"step {step:3d}  global loss {float(loss.detach()):.4f}")
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        replicas = [torch.zeros_like(weights) for _ in range(world)]
        dist.all_gather(replicas, weights)
        if rank == 0:
            assert all(torch.equal(x, losses[0]) for x in losses), "ranks disagree on the loss"
            assert all(torch.equal(w, replicas[0]) for w in replicas), "replicas diverged"
            with open(out, "w") as fh:
                fh.write(f"{float(losses[0]):.6f}\n")
            print(f"final global loss {float(losses[0]):.4f} on {world} ranks; "
                  f"replicas equal; queue per rank: {tuple(loss_fn.queue_text.shape)}")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        out = os.path.join(tmp, "loss.txt")
        mp.spawn(worker, args=(args.world, init, args.steps, out), nprocs=args.world,
                 join=True)
        with open(out) as fh:
            return float(fh.read())


if __name__ == "__main__":
    main()
