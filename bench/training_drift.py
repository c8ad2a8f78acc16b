"""Per-item offset drift and retrieval of NCLLoss training configurations (docs/training.md).

    python bench/training_drift.py [--budget quick|default] [--seeds 0 1 2] [--only NAME ...]

Small towers trained from scratch on the demo's synthetic data (``ncl_kernels.train``),
every configuration with the same seeds, batches and budget. For each it prints, as means
over the seeds, held-out R@1 in both directions with the plain logits (``none``) and the
bank bias (``bank``), the offset spread on the training set (the standard deviation over
captions, and over videos, of their mean logit: ``ncl_kernels.train.evaluate.
offset_spread``), and the paired difference to CLIP (bank bias) with its standard error.
Quality numbers only: the machine's load does not change them.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ncl_kernels import NCLLoss
from ncl_kernels.train import data as D, evaluate as E, model as M

BUDGETS = {"quick": dict(n_videos=1000, epochs=5, batch_size=64, lr=2e-3, queue=256),
           "default": dict(n_videos=5000, epochs=10, batch_size=128, lr=1e-3, queue=512)}


class ClipMix(torch.nn.Module):
    """``(1 - mix) * NCL + mix * CLIP`` on the same batch: a candidate restoring force."""

    def __init__(self, mix: float, **ncl):
        super().__init__()
        self.mix, self.ncl, self.clip = mix, NCLLoss(**ncl), NCLLoss(n_iters=0)

    def forward(self, x, y, scale, caption_to_video=None):
        return ((1 - self.mix) * self.ncl(x, y, scale, caption_to_video=caption_to_video)
                + self.mix * self.clip(x, y, scale, caption_to_video=caption_to_video))


def configs(K: int) -> dict:
    plain = dict(bias_gradient=False, offset_penalty=0.0)
    return {
        "clip": lambda: NCLLoss(n_iters=0),
        "n_iters=4": lambda: NCLLoss(n_iters=4),
        "n_iters=10": lambda: NCLLoss(n_iters=10),
        "n_iters=20 (default)": lambda: NCLLoss(),
        f"queue {K}, n_iters=4, plain": lambda: NCLLoss(n_iters=4, queue_size=K, **plain),
        f"queue {K}, plain": lambda: NCLLoss(queue_size=K, **plain),
        f"queue {K}, bias gradient only": lambda: NCLLoss(queue_size=K, offset_penalty=0.0),
        f"queue {K}, offset penalty only": lambda: NCLLoss(queue_size=K, bias_gradient=False),
        f"queue {K} (default terms)": lambda: NCLLoss(queue_size=K),
        f"queue {K}, n_iters=4 (default terms)": lambda: NCLLoss(n_iters=4, queue_size=K),
        f"queue {K}, CLIP mix 0.25, plain": lambda: ClipMix(0.25, queue_size=K, **plain),
        f"queue {K} as negatives, plain": lambda: NCLLoss(queue_size=K,
                                                          queue_as_negatives=True, **plain),
    }


def run(make, budget, seed):
    paired = D.synthetic(budget["n_videos"], seed=seed)
    train_set, test_set = D.split_by_video(paired, 0.2, seed)
    steps = budget["epochs"] * (train_set.text.shape[0] // budget["batch_size"])
    model = M.train(train_set, make(), steps=steps, batch_size=budget["batch_size"],
                    lr=budget["lr"], seed=seed, device="cpu")
    result, _ = E.evaluate_run(model, train_set, test_set, "cpu", seed=seed)
    spread = E.offset_spread(model, train_set, "cpu")
    out = {f"{way}_{name}": result[way][method]["R@1"] for way in ("t2v", "v2t")
           for name, method in (("none", "none"), ("bank", "ncl_bank"))}
    return dict(out, sd_captions=spread["captions"], sd_videos=spread["videos"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--budget", choices=BUDGETS, default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", help="configuration names (default: all)")
    p.add_argument("--json", help="write every seed's numbers here")
    a = p.parse_args()
    torch.set_num_threads(1)
    budget = BUDGETS[a.budget]
    table = configs(budget["queue"])
    names = a.only or list(table)
    results = {}
    print(f"budget {a.budget}, seeds {a.seeds}; R@1 (none / bank), offset spread "
          f"(captions / videos), NCL - CLIP with the bank bias")
    print(f"{'configuration':40}{'t2v none':>9}{'bank':>7}{'v2t none':>9}{'bank':>7}"
          f"{'sd cap':>8}{'vid':>6}{'d t2v':>15}{'d v2t':>15}")
    for name in ["clip"] + [n for n in names if n != "clip"]:
        results[name] = [run(table[name], budget, seed) for seed in a.seeds]
        rs = results[name]
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
        cells = []
        for way in ("t2v_bank", "v2t_bank"):
            d = [r[way] - c[way] for r, c in zip(rs, results["clip"])]
            mu = sum(d) / len(d)
            se = (math.sqrt(sum((v - mu) ** 2 for v in d) / (len(d) - 1) / len(d))
                  if len(d) > 1 else float("nan"))
            cells.append(f"{mu:+6.2f} +- {se:4.2f}")
        print(f"{name:40}{mean['t2v_none']:9.2f}{mean['t2v_bank']:7.2f}"
              f"{mean['v2t_none']:9.2f}{mean['v2t_bank']:7.2f}{mean['sd_captions']:8.2f}"
              f"{mean['sd_videos']:6.2f}" + "".join(f"{c:>15}" for c in cells), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
