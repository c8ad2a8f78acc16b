"""The two PNGs of the demo. matplotlib is imported here, lazily (``--help`` stays fast),
with the non-interactive Agg backend (no display needed)."""

from __future__ import annotations

import numpy as np

from .evaluate import RANKS_WITH

COLORS = {"clip": "tab:blue", "ncl": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summed_probability_histogram(summed: dict, errors: dict, path: str) -> None:
    """Histogram of the per-item summed retrieval probability (ideal: 1 for every item)
    under the scores each run ranks with (``summed[run]``: a tensor over test videos)."""
    plt = _pyplot()
    values = {run: s.detach().cpu().numpy() for run, s in summed.items()}
    top = max(2.0, max(float(v.max()) for v in values.values()))
    bins = np.linspace(0.0, top, 60)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for run, v in values.items():
        scores = "plain logits" if RANKS_WITH[run] == "none" else "logits + bank bias"
        label = f"{run.upper()} ({scores}): error {errors[run]:.3f}"
        ax.hist(v, bins=bins, alpha=0.6, color=COLORS[run], label=label)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="ideal (1 per item)")
    ax.set_xlabel("summed text-to-video retrieval probability per test video")
    ax.set_ylabel("test videos")
    ax.set_title("Hubs: items that collect more than their share")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recall_bars(runs: dict, path: str) -> None:
    """R@1/5/10 of both runs under every test-time method, text-to-video and back."""
    plt = _pyplot()
    keys = ("R@1", "R@5", "R@10")
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2), sharey=True)
    for ax, way in zip(axes, ("t2v", "v2t")):
        series = [(run, method) for run in runs for method in runs[run][way]]
        width = 0.8 / len(series)
        for k, (run, method) in enumerate(series):
            x = np.arange(len(keys)) + (k - (len(series) - 1) / 2) * width
            shade = 0.45 + 0.55 * (k % len(runs[run][way])) / max(1, len(runs[run][way]) - 1)
            ax.bar(x, [runs[run][way][method][key] for key in keys], width,
                   color=COLORS[run], alpha=shade, label=f"{run} / {method}")
        ax.set_xticks(np.arange(len(keys)), keys)
        ax.set_title({"t2v": "text to video", "v2t": "video to text"}[way])
    axes[0].set_ylabel("recall (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
               title="training run / test-time method", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
