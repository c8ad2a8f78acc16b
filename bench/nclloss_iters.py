"""Time of one NCLLoss training step (forward + backward) against its Sinkhorn iterations.

    python bench/nclloss_iters.py [--device cpu|cuda] [--threads T] [--reps R]

For each problem size, the configurations run interleaved, round-robin, ``--reps`` times
each, and the table gives the median time per step and its ratio to ``n_iters=0`` (CLIP's
loss) and to ``n_iters=4``; ratios taken back to back in one process hold on a loaded
machine where absolute times do not. The queue rows add the training terms a queue turns
on (the own-bias gradient and the offset penalty) against a queue without them.
``--demo`` times whole training steps of the demo's towers instead (forward, loss,
backward, AdamW), batch 128 of its synthetic features.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ncl_kernels as nk

ITERS = [0, 4, 10, 20]


def step(loss_fn, x, y, s, sync):
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    t0 = time.perf_counter()
    loss = loss_fn(xx, yy, s)
    loss.backward()
    sync()
    return time.perf_counter() - t0


def demo_steps(dev, sync, reps):
    """Whole training steps of the demo's towers (``ncl_kernels.train``), per loss."""
    from ncl_kernels.train import data as D
    from ncl_kernels.train.model import DualEncoder

    paired = D.synthetic(400, seed=0)
    text, video = paired.text[:128].to(dev), paired.video[paired.text_to_video[:128]].to(dev)
    c2v = torch.arange(128, device=dev)
    configs = {f"n_iters={k}": nk.NCLLoss(n_iters=k) for k in ITERS}
    configs["queue 512 (default terms)"] = nk.NCLLoss(queue_size=512)
    models = {name: DualEncoder(text.shape[1], video.shape[1]).to(dev) for name in configs}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    def one(name):
        model, loss_fn, opt = models[name], configs[name], opts[name]
        t0 = time.perf_counter()
        loss = loss_fn(model.text(text), model.video(video), model.scale(),
                       caption_to_video=c2v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    for name in configs:
        for _ in range(10):
            one(name)
    times = {name: [] for name in configs}
    for _ in range(reps):
        for name in configs:
            times[name].append(one(name))
    table(f"demo towers, batch 128, {dev} (median of {reps})", times)


def table(title, times):
    """Median per configuration and its ratios to ``n_iters=0`` and ``n_iters=4``."""
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{title}")
    print(f"{'config':28} {'ms':>9} {'/ n=0':>7} {'/ n=4':>7}")
    for name, t in med.items():
        print(f"{name:28} {1e3 * t:9.2f} {t / med['n_iters=0']:7.2f} "
              f"{t / med['n_iters=4']:7.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--sizes", default="256x256,1024x512,4096x512",
                   help="batch x D, comma-separated")
    p.add_argument("--demo", action="store_true", help="time the demo's training steps")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if a.demo:
        return demo_steps(dev, sync, a.reps)
    for n, d in (tuple(int(v) for v in size.split("x")) for size in a.sizes.split(",")):
        gen = torch.Generator().manual_seed(0)
        x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dev)
        y = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dev)
        s = torch.tensor(20.0, device=dev)
        configs = {f"n_iters={k}": nk.NCLLoss(n_iters=k) for k in ITERS}
        K = n
        configs[f"queue {K}, plain"] = nk.NCLLoss(n_iters=20, queue_size=K,
                                                 queue_as_negatives=False,
                                                 bias_gradient=False, offset_penalty=0.0)
        configs[f"queue {K}, default terms"] = nk.NCLLoss(n_iters=20, queue_size=K,
                                                         queue_as_negatives=False)
        for m in configs.values():   # warm up; fill the queues
            for _ in range(5):
                step(m.to(dev), x, y, s, sync)
        times = {name: [] for name in configs}
        for _ in range(a.reps):
            for name, m in configs.items():
                times[name].append(step(m, x, y, s, sync))
        table(f"batch {n}, D {d}, {dev} (median of {a.reps})", times)


if __name__ == "__main__":
    main()
