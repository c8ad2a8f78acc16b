"""Swap open_clip's ClipLoss for NCLClipLoss in an open_clip-style training loop.

In open_clip_train (or your own loop) the change is one line:

    from open_clip import ClipLoss                      # before
    from ncl_kernels import NCLClipLoss as ClipLoss     # after (n_iters=4: NCL)

NCLClipLoss takes ClipLoss's constructor (local_loss, gather_with_grad, cache_labels, rank,
world_size) and its call, ``loss(**model_out, output_dict=True)``. This script runs such a
loop on CPU with a tiny two-tower model on synthetic pairs, once with ``n_iters=0`` (exactly
ClipLoss) and once with NCL's biases, and reports held-out text-to-image retrieval.

    python examples/open_clip_swap.py [--steps 150]
"""

import argparse

import torch
from torch import nn

import ncl_kernels as nk


class TinyClip(nn.Module):
    """Returns what open_clip's CLIP.forward returns: normalized features, logit_scale.exp()."""

    def __init__(self, image_dim, text_dim, embed_dim=32):
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(image_dim, 64), nn.GELU(), nn.Linear(64, embed_dim))
        self.text = nn.Sequential(nn.Linear(text_dim, 64), nn.GELU(), nn.Linear(64, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))   # log(1/0.07), as open_clip

    def forward(self, image, text):
        unit = nn.functional.normalize
        return {"image_features": unit(self.visual(image), dim=-1),
                "text_features": unit(self.text(text), dim=-1),
                "logit_scale": self.logit_scale.exp()}


def synthetic_pairs(n, seed=0):
    """Images and captions that share a latent (fixed maps, so held-out pairs come from the
    same world); a tenth of the latents crowd around one direction (look-alikes)."""
    maps = torch.Generator().manual_seed(1234)
    to_image = torch.randn(16, 48, generator=maps)
    to_text = torch.randn(16, 24, generator=maps)
    crowd = torch.randn(1, 16, generator=maps)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 16, generator=gen)
    z[: n // 10] += 2.0 * crowd
    image = torch.tanh(z @ to_image) + 0.3 * torch.randn(n, 48, generator=gen)
    text = z @ to_text + 0.8 * torch.randn(n, 24, generator=gen)
    return image, text


def train(loss_fn, steps, batch=64, seed=0):
    image, text = synthetic_pairs(2000, seed)
    torch.manual_seed(seed)
    model = TinyClip(image.shape[1], text.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, image.shape[0], (batch,), generator=gen)
        losses = loss_fn(**model(image[idx], text[idx]), output_dict=True)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
    return model, float(total.detach())


@torch.no_grad()
def evaluate(model):
    image, text = synthetic_pairs(1000, seed=1)                  # held out
    out = model(image, text)
    ranks = nk.retrieval.ranks(out["text_features"], out["image_features"], torch.arange(1000))
    return nk.retrieval.metrics(ranks, ks=(1, 5, 10))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    table, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)                # small batches: one thread is fastest
    for name, n_iters in (("ClipLoss", 0), ("NCLClipLoss", 4)):
        model, last = train(nk.NCLClipLoss(n_iters=n_iters, cache_labels=True), args.steps)
        table[name] = evaluate(model)
        print(f"{name} (n_iters={n_iters}): last training loss {last:.4f}")
    torch.set_num_threads(threads)
    print("\nheld-out text-to-image retrieval, plain logits (1000 pairs)")
    print(nk.retrieval.format_metrics(table))


if __name__ == "__main__":
    main()
