"""``python -m ncl_kernels.train``: the command line, the two runs, the table and outputs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

from .. import retrieval as R
from . import data as D
from .evaluate import METHODS, RANKS_WITH, evaluate_run, normalization_error
from .model import make_loss, train

DATA_HELP = ("'synthetic' (default: generated, seeded, with hubs), 'digits' (scikit-learn's "
             "handwritten digits, left half vs right half) or FILE.npz with arrays text "
             "(N x Dt), video (M x Dv) and text_to_video (N,)")
# (videos of the synthetic set, epochs, batch size in captions, NCL queue length, lr)
BUDGETS = {"default": dict(n_videos=5000, epochs=10, batch_size=128, queue_size=512, lr=1e-3),
           "quick": dict(n_videos=1000, epochs=5, batch_size=64, queue_size=256, lr=2e-3)}
TEST_FRACTION = 0.2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ncl_kernels.train",
        description="Train two small towers (MLP heads over precomputed features) with "
                    "CLIP's loss and with NCLLoss (same seed and budget) and compare "
                    "held-out text-to-video and video-to-text retrieval.")
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--out", metavar="DIR", help="write metrics.json and two PNG plots here")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a CI-sized run (smaller synthetic set, fewer epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="passes over the training captions "
                   "(default 10; --quick: 5)")
    p.add_argument("--batch-size", type=int, help="captions per step (default 128; "
                   "--quick: 64)")
    p.add_argument("--queue-size", type=int, help="NCLLoss queue length (default 512; "
                   "--quick: 256)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and the C++ "
                   "kernels (torch.set_num_threads; default: PyTorch's, one per core). On a "
                   "machine whose cores are busy, 1 is often fastest for these small batches")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    budget = dict(BUDGETS["quick" if args.quick else "default"])
    for key in ("epochs", "batch_size", "queue_size"):
        value = getattr(args, key)
        if value is not None:
            if value < (0 if key == "queue_size" else 1):
                p.error(f"--{key.replace('_', '-')} must be "
                        f"{'>= 0' if key == 'queue_size' else '>= 1'}; got {value}")
            budget[key] = value
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(p, args.device)
    for package in ("tqdm",) + (("matplotlib",) if args.out else ()):
        if importlib.util.find_spec(package) is None:   # found, not imported: stays fast
            p.error(f"the demo needs {package}: pip install 'ncl_kernels[demo]'")
    if args.out:
        try:   # fail now, not after training
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            p.error(f"--out {args.out}: {e}")
    from tqdm.auto import tqdm

    try:
        paired = _load(args.data, budget, args.seed)
        train_set, test_set = D.split_by_video(paired, TEST_FRACTION, args.seed)
    except ValueError as e:
        p.error(str(e))
    budget["batch_size"] = min(budget["batch_size"], train_set.text.shape[0])
    steps = budget["epochs"] * (train_set.text.shape[0] // budget["batch_size"])
    info = {"source": args.data, "seed": args.seed, "text_dim": paired.text.shape[1],
            "video_dim": paired.video.shape[1], "train": train_set.sizes,
            "test": test_set.sizes}
    print(f"data: {args.data}: {train_set.sizes['videos']} training videos "
          f"({train_set.sizes['captions']} captions), {test_set.sizes['videos']} test videos "
          f"({test_set.sizes['captions']} captions); device {device}; {steps} steps of "
          f"{budget['batch_size']} captions per run; NCL queue {budget['queue_size']}")

    runs, summed_all, t0 = {}, {}, time.time()
    for run in ("clip", "ncl"):
        model = train(train_set, make_loss(run, budget["queue_size"]).to(device),
                      steps=steps, batch_size=budget["batch_size"], lr=budget["lr"],
                      seed=args.seed, device=device,
                      progress=lambda it, run=run: tqdm(it, desc=f"train {run}",
                                                        mininterval=0.5))
        runs[run], summed_all[run] = evaluate_run(model, train_set, test_set, device,
                                                  seed=args.seed)
        runs[run]["normalization_error"] = normalization_error(summed_all[run][RANKS_WITH[run]])
    print(f"trained and evaluated in {time.time() - t0:.1f} s\n")
    print(report(runs, summed_all, test_set.sizes))

    if args.out:
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump({"data": info, "runs": runs}, fh, indent=2)
        from . import plots

        own = {run: summed_all[run][RANKS_WITH[run]] for run in runs}
        errors = {run: runs[run]["normalization_error"] for run in runs}
        plots.summed_probability_histogram(own, errors,
                                           os.path.join(args.out, "summed_probability.png"))
        plots.recall_bars(runs, os.path.join(args.out, "recall.png"))
        print(f"\nwrote metrics.json, summed_probability.png and recall.png to {args.out}")
    return 0


def _device(p, name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        p.error(f"--device {name}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {name}: no CUDA device is visible to PyTorch here")
    return device


def _load(source: str, budget: dict, seed: int):
    if source == "synthetic":
        return D.synthetic(budget["n_videos"], seed=seed)
    if source == "digits":
        return D.digits()
    return D.from_npz(source)


def report(runs: dict, summed_all: dict, test_sizes: dict) -> str:
    """The metrics table: both directions, every run x method; then the normalization
    error of every run x method (``*``: the scores the run ranks with, in metrics.json)."""
    lines = []
    for way, title in (("t2v", "text-to-video"), ("v2t", "video-to-text")):
        lines.append(f"{title} ({test_sizes['captions']} test captions, "
                     f"{test_sizes['videos']} test videos)")
        lines.append(R.format_metrics({f"{run} {m}": runs[run][way][m]
                                       for run in runs for m in METHODS}))
        lines.append("")
    lines.append("normalization error: mean |summed text-to-video probability - 1| over "
                 "test videos")
    lines.append(f"{'':7}" + "".join(f"{m:>10}" for m in METHODS))
    for run in runs:
        cells = [f"{normalization_error(summed_all[run][m]):9.3f}"
                 + ("*" if m == RANKS_WITH[run] else " ") for m in METHODS]
        lines.append(f"{run:7}" + "".join(cells))
    lines.append("(* the scores the run ranks with: CLIP the plain logits, NCL the logits "
                 "plus the bank's gallery bias)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
