"""``python -m ncl_kernels.train``: the command line, the runs, the tables and outputs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import torch

from .. import retrieval as R
from . import data as D
from .evaluate import METHODS, RANKS_WITH, evaluate_run, normalization_error, offset_spread
from .model import make_loss, train

DATA_HELP = ("'synthetic' (default: generated, seeded, with hubs), 'digits' (scikit-learn's "
             "handwritten digits, left half vs right half) or FILE.npz with arrays text "
             "(N x Dt), video (M x Dv) and text_to_video (N,)")
SCENARIOS = ("finetune", "scratch")
SCENARIO_HELP = ("'finetune' (default for synthetic data): towers pretrained with CLIP's "
                 "loss on another distribution (synthetic) or on half of the training "
                 "videos (other data), then fine-tuned with CLIP vs NCL for a short budget; "
                 "'scratch' (default otherwise): both trained from a random initialization")
# n_videos: the target set (synthetic); pre_videos: the pretraining set (synthetic);
# epochs: the compared runs' budget per scenario; lr: pretraining and scratch runs;
# ft_lr: fine-tuning; batch_size in captions
BUDGETS = {
    "default": dict(n_videos=5000, pre_videos=5000, pre_epochs=5, batch_size=128, lr=1e-3,
                    ft_lr=5e-4, seeds=3, epochs={"finetune": 2, "scratch": 10}),
    "quick": dict(n_videos=1000, pre_videos=1000, pre_epochs=4, batch_size=64, lr=2e-3,
                  ft_lr=1e-3, seeds=2, epochs={"finetune": 2, "scratch": 5}),
}
TEST_FRACTION = 0.2
RUNS = ("clip", "ncl")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ncl_kernels.train",
        description="Train two small towers (MLP heads over precomputed features) with "
                    "CLIP's loss and with NCLLoss (same seeds, batches and budget) and "
                    "compare held-out text-to-video and video-to-text retrieval.")
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--scenario", choices=SCENARIOS, help=SCENARIO_HELP)
    p.add_argument("--out", metavar="DIR", help="write metrics.json and two PNG plots here")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a CI-sized run (smaller synthetic set, fewer epochs and seeds)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--seeds", type=int, help="how many seeds, seed, seed + 1, ...: each "
                   "draws its own data, split and initialization (default 3; --quick: 2)")
    p.add_argument("--epochs", type=int, help="passes over the training captions of the "
                   "compared runs (default: 2 fine-tuning, 10 from scratch; --quick: 2, 5)")
    p.add_argument("--batch-size", type=int, help="captions per step (default 128; "
                   "--quick: 64)")
    p.add_argument("--queue-size", type=int, default=0, help="NCLLoss queue length, which "
                   "only shapes the biases (default 0: biases from the batch)")
    p.add_argument("--n-iters", type=int, help="NCL's Sinkhorn iterations (default: "
                   "NCLLoss's, 20)")
    p.add_argument("--hubness", type=float, default=1.0, help="weight of the synthetic "
                   "data's item-level hubs (default 1; 0: none; see data.synthetic)")
    p.add_argument("--batches", choices=("captions", "videos"), default="captions",
                   help="a batch is random captions and their videos (default) or random "
                        "whole videos with all their captions, as many captions")
    p.add_argument("--positives", choices=("mean", "all", "first"), default="mean",
                   help="a video's video-to-text targets in a batch (both losses): all of "
                        "its captions, one term each ('mean', default) or their total "
                        "probability ('all'), or only the first (see NCLLoss)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and the C++ "
                   "kernels (torch.set_num_threads; default: PyTorch's, one per core). On a "
                   "machine whose cores are busy, 1 is often fastest for these small batches")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    budget = dict(BUDGETS["quick" if args.quick else "default"])
    scenario = args.scenario or ("finetune" if args.data == "synthetic" else "scratch")
    budget["epochs"] = budget["epochs"][scenario]
    budget["n_iters"] = args.n_iters
    budget["hubness"] = args.hubness
    for key, low in (("epochs", 1), ("batch_size", 1), ("seeds", 1), ("queue_size", 0),
                     ("n_iters", 1), ("hubness", 0)):
        value = getattr(args, key)
        if value is not None:
            if value < low:
                p.error(f"--{key.replace('_', '-')} must be >= {low}; got {value}")
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

    seeds = list(range(args.seed, args.seed + budget["seeds"]))
    per_seed, t0 = [], time.time()
    for k, seed in enumerate(seeds):
        try:
            pre_set, train_set, test_set = _load(args.data, scenario, budget, seed)
        except ValueError as e:
            p.error(str(e))
        if k == 0:
            info = _describe(args, scenario, budget, pre_set, train_set, test_set, device,
                             seeds)
        per_seed.append(_one_seed(scenario, budget, args.positives, seed, device, pre_set,
                                  train_set, test_set, tqdm, args.batches == "videos"))
    print(f"trained and evaluated in {time.time() - t0:.1f} s\n")
    summary = summarize(per_seed)
    print(report(summary, info["test"], seeds))

    if args.out:
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump({"data": info, **{k: v for k, v in summary.items() if k != "summed"},
                       "per_seed": [{k: v for k, v in s.items() if k != "summed"}
                                    for s in per_seed]}, fh, indent=2)
        from . import plots

        first = per_seed[0]
        own = {run: first["summed"][run][RANKS_WITH[run]] for run in RUNS}
        errors = {run: first["runs"][run]["normalization_error"] for run in RUNS}
        plots.summed_probability_histogram(own, errors,
                                           os.path.join(args.out, "summed_probability.png"))
        plots.recall_bars(summary["runs"], os.path.join(args.out, "recall.png"))
        print(f"\nwrote metrics.json, summed_probability.png and recall.png to {args.out}")
    return 0


def _one_seed(scenario, budget, positives, seed, device, pre_set, train_set, test_set,
              tqdm, whole_videos) -> dict:
    """Pretraining (fine-tuning scenario), the two compared runs and their evaluation."""
    B = min(budget["batch_size"], train_set.text.shape[0])
    out = {"seed": seed, "runs": {}, "summed": {}}
    base, lr = None, budget["lr"]
    if scenario == "finetune":
        Bp = min(budget["batch_size"], pre_set.text.shape[0])
        base = train(pre_set, make_loss("clip", positives=positives).to(device),
                     steps=budget["pre_epochs"] * (pre_set.text.shape[0] // Bp),
                     batch_size=Bp, lr=budget["lr"], seed=seed, device=device,
                     progress=lambda it: tqdm(it, desc=f"seed {seed} pretrain (clip)",
                                              mininterval=0.5))
        out["pretrained"] = _evaluate(base, train_set, test_set, device, seed)[0]
        lr = budget["ft_lr"]
    for run in RUNS:
        loss = make_loss(run, budget["queue_size"], positives, budget["n_iters"])
        model = train(train_set, loss.to(device),
                      steps=budget["epochs"] * (train_set.text.shape[0] // B), batch_size=B,
                      lr=lr, seed=seed, device=device, init=base, whole_videos=whole_videos,
                      progress=lambda it, run=run: tqdm(it, desc=f"seed {seed} train {run}",
                                                        mininterval=0.5))
        out["runs"][run], out["summed"][run] = _evaluate(model, train_set, test_set, device,
                                                         seed, run)
    return out


def _evaluate(model, train_set, test_set, device, seed, run="clip"):
    result, summed = evaluate_run(model, train_set, test_set, device, seed=seed)
    result["normalization_errors"] = {m: normalization_error(summed[m]) for m in METHODS}
    result["normalization_error"] = result["normalization_errors"][RANKS_WITH[run]]
    result["offset_spread"] = offset_spread(model, train_set, device)
    return result, summed


def summarize(per_seed: list) -> dict:
    """Means over seeds of every run (and the pretrained towers), and the paired
    difference NCL - CLIP of R@1 for each direction and test-time method: its mean and
    standard error (sample sd / sqrt(seeds); ``None`` for one seed)."""
    def mean_of(items):
        first = items[0]
        if isinstance(first, dict):
            return {k: mean_of([it[k] for it in items]) for k in first}
        return sum(items) / len(items)

    out = {"seeds": [s["seed"] for s in per_seed],
           "runs": {run: mean_of([s["runs"][run] for s in per_seed]) for run in RUNS}}
    if "pretrained" in per_seed[0]:
        out["pretrained"] = mean_of([s["pretrained"] for s in per_seed])
    out["paired"] = {}
    for way in ("t2v", "v2t"):
        out["paired"][way] = {}
        for m in METHODS:
            d = [s["runs"]["ncl"][way][m]["R@1"] - s["runs"]["clip"][way][m]["R@1"]
                 for s in per_seed]
            out["paired"][way][m] = {"mean": sum(d) / len(d), "se": _standard_error(d)}
    return out


def _standard_error(d):
    if len(d) < 2:
        return None
    mu = sum(d) / len(d)
    return math.sqrt(sum((v - mu) ** 2 for v in d) / (len(d) - 1) / len(d))


def report(summary: dict, test_sizes: dict, seeds: list) -> str:
    """The tables: every run x method (means over seeds) in both directions, the
    normalization error, the offset spread, and the paired differences NCL - CLIP."""
    over = (f"mean over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
            if len(seeds) > 1 else f"seed {seeds[0]}")
    runs = dict(summary["runs"])
    if "pretrained" in summary:
        runs = {"pretrained": summary["pretrained"], **runs}
    lines = []
    for way, title in (("t2v", "text-to-video"), ("v2t", "video-to-text")):
        lines.append(f"{title} ({test_sizes['captions']} test captions, "
                     f"{test_sizes['videos']} test videos; {over})")
        lines.append(R.format_metrics({f"{run} {m}": runs[run][way][m]
                                       for run in runs for m in METHODS}))
        lines.append("")
    lines.append("normalization error: mean |summed text-to-video probability - 1| over "
                 "test videos")
    lines.append(f"{'':11}" + "".join(f"{m:>10}" for m in METHODS))
    for run in runs:
        ranks_with = RANKS_WITH.get(run, "none")
        cells = [f"{runs[run]['normalization_errors'][m]:9.3f}"
                 + ("*" if m == ranks_with else " ") for m in METHODS]
        lines.append(f"{run:11}" + "".join(cells))
    lines.append("(* the scores the run ranks with: CLIP the plain logits, NCL the logits "
                 "plus the bank's gallery bias)")
    lines.append("")
    lines.append("offset spread: sd over training captions (videos) of their mean logit")
    for run in runs:
        o = runs[run]["offset_spread"]
        lines.append(f"{run:11} captions {o['captions']:6.2f}   videos {o['videos']:6.2f}")
    lines.append("")
    n = len(seeds)
    lines.append(f"NCL - CLIP, R@1, same test-time method (paired over {n} seed"
                 f"{'s' if n > 1 else ''}: mean +- standard error)")
    lines.append(f"{'method':11}{'text-to-video':>17}{'video-to-text':>17}")
    for m in METHODS:
        cells = []
        for way in ("t2v", "v2t"):
            d = summary["paired"][way][m]
            se = "    n/a" if d["se"] is None else f"{d['se']:7.2f}"
            cells.append(f"{d['mean']:+7.2f} +-{se}")
        lines.append(f"{m:11}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def _describe(args, scenario, budget, pre_set, train_set, test_set, device, seeds) -> dict:
    steps = budget["epochs"] * (train_set.text.shape[0]
                                // min(budget["batch_size"], train_set.text.shape[0]))
    info = {"source": args.data, "scenario": scenario, "seeds": seeds,
            "positives": args.positives, "batches": args.batches,
            "queue_size": budget["queue_size"],
            "text_dim": train_set.text.shape[1], "video_dim": train_set.video.shape[1],
            "train": train_set.sizes, "test": test_set.sizes, "steps": steps}
    print(f"data: {args.data}: {train_set.sizes['videos']} training videos "
          f"({train_set.sizes['captions']} captions), {test_set.sizes['videos']} test videos "
          f"({test_set.sizes['captions']} captions); device {device}; {len(seeds)} seed"
          f"{'s' if len(seeds) > 1 else ''}")
    if scenario == "finetune":
        info["pretrain"] = pre_set.sizes
        where = ("another distribution (reversed concept popularity)"
                 if args.data == "synthetic" else "half of the training videos")
        print(f"scenario: finetune: pretrained with CLIP's loss on {where}, "
              f"{pre_set.sizes['videos']} videos ({pre_set.sizes['captions']} captions), "
              f"{budget['pre_epochs']} epochs; then {steps} steps of {budget['batch_size']} "
              f"captions per run (lr {budget['ft_lr']:g})")
    else:
        print(f"scenario: scratch: {steps} steps of {budget['batch_size']} captions per run")
    queue = f"a queue of {budget['queue_size']}" if budget["queue_size"] else "no queue"
    iters = "" if budget["n_iters"] is None else f"n_iters={budget['n_iters']}, "
    print(f"NCL: NCLLoss defaults, {iters}{queue}; batches of {args.batches}; "
          f"video-to-text positives: {args.positives}")
    info.update(n_iters=budget["n_iters"], hubness=budget["hubness"])
    return info


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


def _load(source: str, scenario: str, budget: dict, seed: int):
    """``(pretraining set or None, training set, test set)``, standardized."""
    if source == "synthetic":
        paired = D.synthetic(budget["n_videos"], seed=seed, hubness=budget["hubness"])
    elif source == "digits":
        paired = D.digits()
    else:
        paired = D.from_npz(source)
    if scenario == "scratch":
        return (None,) + D.split_by_video(paired, TEST_FRACTION, seed)
    if source == "synthetic":
        # the same world (concepts, sensors), items drawn from another distribution; the
        # pretrained towers keep the pretraining set's input standardization
        pre = D.synthetic(budget["pre_videos"], seed=seed + 10_000, world_seed=seed,
                          popularity="reversed", hubness=budget["hubness"])
        train_set, test_set = D.split_by_video(paired, TEST_FRACTION, seed,
                                               standardize_with=pre)
        D.z_score(pre, pre)
        return pre, train_set, test_set
    train_all, test_set = D.split_by_video(paired, TEST_FRACTION, seed, standardize=False)
    pre, train_set = D.split_by_video(train_all, 0.5, seed + 1, standardize=False)
    D.z_score(pre, train_set, test_set, pre)
    return pre, train_set, test_set


if __name__ == "__main__":
    sys.exit(main())
