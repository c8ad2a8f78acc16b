"""The demo, ``python -m ncl_kernels.train``: its --quick run, its npz path, its refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from ncl_kernels.train import main  # noqa: E402

from conftest import child_env  # noqa: E402

METRIC_KEYS = {"R@1", "R@5", "R@10", "R@50", "MdR", "MnR"}
METHODS = {"none", "ncl_bank", "qbnorm"}


def check_run(run):
    assert set(run) == {"t2v", "v2t", "normalization_error", "normalization_errors",
                        "offset_spread"}
    assert isinstance(run["normalization_error"], float)
    assert run["normalization_error"] >= 0
    assert set(run["normalization_errors"]) == METHODS
    assert set(run["offset_spread"]) == {"captions", "videos"}
    for way in ("t2v", "v2t"):
        assert set(run[way]) == METHODS
        for m in run[way].values():
            assert set(m) == METRIC_KEYS
            assert all(isinstance(v, float) and np.isfinite(v) for v in m.values())
            assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= m["R@50"] <= 100


def check_metrics_json(path, n_seeds=None):
    """The schema: means over seeds, the paired differences, and every seed's runs."""
    with open(path) as fh:
        out = json.load(fh)
    finetune = out["data"]["scenario"] == "finetune"
    assert set(out) == {"data", "seeds", "runs", "paired", "per_seed"} | (
        {"pretrained"} if finetune else set())
    assert set(out["runs"]) == {"clip", "ncl"}
    for run in out["runs"].values():
        check_run(run)
    if finetune:
        check_run(out["pretrained"])
    seeds = out["seeds"]
    assert n_seeds is None or len(seeds) == n_seeds
    assert [s["seed"] for s in out["per_seed"]] == seeds
    for way in ("t2v", "v2t"):
        assert set(out["paired"][way]) == METHODS
        for m, d in out["paired"][way].items():
            diffs = [s["runs"]["ncl"][way][m]["R@1"] - s["runs"]["clip"][way][m]["R@1"]
                     for s in out["per_seed"]]
            assert d["mean"] == pytest.approx(np.mean(diffs))
            if len(seeds) == 1:
                assert d["se"] is None
            else:
                assert d["se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
            mean_clip = np.mean([s["runs"]["clip"][way][m]["R@1"] for s in out["per_seed"]])
            assert out["runs"]["clip"][way][m]["R@1"] == pytest.approx(mean_clip)
    return out


@pytest.mark.slow
def test_quick_run(tmp_path):
    """What a newcomer runs first, as a subprocess: outputs exist and NCL normalizes."""
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ncl_kernels.train", "--quick", "--out",
                           str(out_dir)], capture_output=True, text=True, env=child_env(),
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text-to-video" in proc.stdout and "normalization error" in proc.stdout
    assert "NCL - CLIP, R@1" in proc.stdout
    out = check_metrics_json(out_dir / "metrics.json", n_seeds=2)
    assert out["data"]["source"] == "synthetic"
    assert out["data"]["scenario"] == "finetune"
    for name in ("summed_probability.png", "recall.png"):
        png = (out_dir / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    runs = out["runs"]
    assert runs["ncl"]["normalization_error"] < runs["clip"]["normalization_error"]


def _features(n_videos, captions, seed=0):
    """Tiny paired features: a caption is a noisy copy of its video's latent."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_videos, 6))
    c2v = np.repeat(np.arange(n_videos), captions)
    text = z[c2v] + 0.3 * rng.standard_normal((c2v.size, 6))
    video = np.tanh(z @ rng.standard_normal((6, 10)))
    return text.astype(np.float32), video.astype(np.float32), c2v


def run_main(argv):
    with torch.random.fork_rng():   # the demo seeds torch's global generator
        return main(argv)


@pytest.mark.slow
def test_npz(tmp_path):
    """Bring your own features: a variable number of captions per video."""
    text, video, c2v = _features(30, np.arange(30) % 3 + 1)
    path = tmp_path / "feats.npz"
    np.savez(path, text=text, video=video, text_to_video=c2v)
    assert run_main(["--data", str(path), "--out", str(tmp_path / "out"), "--epochs", "2",
                     "--seeds", "1"]) == 0
    out = check_metrics_json(tmp_path / "out" / "metrics.json", n_seeds=1)
    assert out["data"]["scenario"] == "scratch"
    assert out["data"]["source"] == str(path)
    assert out["data"]["train"]["videos"] + out["data"]["test"]["videos"] == 30
    assert out["data"]["train"]["captions"] + out["data"]["test"]["captions"] == c2v.size


def test_whole_video_batches(tmp_path):
    """Batches of whole videos: every caption of a batch's videos, all positives."""
    text, video, c2v = _features(40, 3)
    path = tmp_path / "feats.npz"
    np.savez(path, text=text, video=video, text_to_video=c2v)
    assert run_main(["--data", str(path), "--out", str(tmp_path / "out"), "--epochs", "2",
                     "--seeds", "1", "--batches", "videos", "--batch-size", "12"]) == 0
    out = check_metrics_json(tmp_path / "out" / "metrics.json", n_seeds=1)
    assert out["data"]["batches"] == "videos"


@pytest.mark.slow
def test_digits(tmp_path):
    """The real dataset that ships with scikit-learn: 1797 digits, left vs right half."""
    pytest.importorskip("sklearn")
    assert run_main(["--data", "digits", "--out", str(tmp_path), "--epochs", "1",
                     "--seeds", "1"]) == 0
    out = check_metrics_json(tmp_path / "metrics.json", n_seeds=1)
    assert out["data"]["train"]["videos"] + out["data"]["test"]["videos"] == 1797
    assert (out["data"]["text_dim"], out["data"]["video_dim"]) == (32, 32)


@pytest.mark.slow
def test_npz_drops_videos_without_captions(tmp_path, capsys):
    text, video, c2v = _features(20, 2)
    keep = c2v < 16   # videos 16..19 have no caption
    path = tmp_path / "gaps.npz"
    np.savez(path, text=text[keep], video=video, text_to_video=c2v[keep])
    with pytest.warns(UserWarning, match="dropped 4 of 20 videos"):
        assert run_main(["--data", str(path), "--epochs", "1", "--seeds", "1"]) == 0
    # the 16 videos with captions are split, 20% held out
    assert "13 training videos (26 captions), 3 test videos (6 captions)" in \
        capsys.readouterr().out


BAD = {
    "missing array": (lambda t, v, c: dict(text=t, video=v), "lacks array"),
    "shape mismatch": (lambda t, v, c: dict(text=t, video=v, text_to_video=c[:-1]),
                       "text_to_video must have shape"),
    "1-D text": (lambda t, v, c: dict(text=t[:, 0], video=v, text_to_video=c),
                 "text must be a non-empty 2-D array"),
    "out of range": (lambda t, v, c: dict(text=t, video=v, text_to_video=c + 1),
                     "must index video rows"),
    "negative index": (lambda t, v, c: dict(text=t, video=v, text_to_video=c - 1),
                       "must index video rows"),
    "float index": (lambda t, v, c: dict(text=t, video=v, text_to_video=c * 1.0),
                    "must be integers"),
    "NaN features": (lambda t, v, c: dict(text=t * np.nan, video=v, text_to_video=c),
                     "contains NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_npz_is_refused(tmp_path, capsys, case):
    make, message = BAD[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **make(*_features(12, 2)))
    with pytest.raises(SystemExit) as info:
        run_main(["--data", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("content", [None, b"not a zip file"])
def test_unreadable_data_path_is_refused(tmp_path, capsys, content):
    path = tmp_path / "feats.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        run_main(["--data", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert ("no such file" if content is None else "not a readable .npz file") in err


def test_finetune_scenario_on_digits(tmp_path):
    """Pretraining on half of the training videos, then the two fine-tuning runs."""
    pytest.importorskip("sklearn")
    assert run_main(["--data", "digits", "--scenario", "finetune", "--out", str(tmp_path),
                     "--epochs", "1", "--seeds", "2"]) == 0
    out = check_metrics_json(tmp_path / "metrics.json", n_seeds=2)
    assert out["data"]["pretrain"]["videos"] + out["data"]["train"]["videos"] \
        + out["data"]["test"]["videos"] == 1797


@pytest.mark.parametrize("argv, message", [(["--seeds", "0"], "--seeds must be >= 1"),
                                           (["--queue-size", "-1"], "--queue-size must be")])
def test_bad_budget_is_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- the drift regression (docs/training.md) ----------------------------------------------

from ncl_kernels import NCLLoss  # noqa: E402
from ncl_kernels.train import data as D, evaluate as E, model as M  # noqa: E402

#: every NCLLoss configuration that the README or a docstring recommends
RECOMMENDED = {"batch biases": lambda: NCLLoss(),
               "queue": lambda: NCLLoss(queue_size=256)}


def _trained(loss, seed=0):
    """The --quick budget from scratch: 310 steps of 64 captions, small towers."""
    paired = D.synthetic(1000, seed=seed)
    train_set, test_set = D.split_by_video(paired, 0.2, seed)
    with torch.random.fork_rng():
        model = M.train(train_set, loss, steps=5 * (train_set.text.shape[0] // 64),
                        batch_size=64, lr=2e-3, seed=seed, device="cpu")
    run, _ = E.evaluate_run(model, train_set, test_set, "cpu", seed=seed)
    return run, E.offset_spread(model, train_set, "cpu")


@pytest.fixture(scope="module")
def clip_run():
    return _trained(NCLLoss(n_iters=0))


def _check_no_drift(run, spread, clip_run):
    clip, clip_spread = clip_run
    for side in ("captions", "videos"):
        assert spread[side] <= 2 * clip_spread[side], (side, spread, clip_spread)
    assert run["v2t"]["ncl_bank"]["R@1"] >= clip["v2t"]["ncl_bank"]["R@1"] - 1.0


@pytest.mark.parametrize("name", sorted(RECOMMENDED))
def test_recommended_configurations_do_not_drift(name, clip_run):
    """Per-item offsets stay within twice CLIP's spread, and video-to-text R@1 with the
    bank bias is not more than a point below CLIP's, at the same seed."""
    _check_no_drift(*_trained(RECOMMENDED[name]()), clip_run)


@pytest.mark.slow
def test_the_plain_queue_drifts(clip_run):
    """The control: without its training terms the queue fails the same check."""
    loss = NCLLoss(n_iters=4, queue_size=256, queue_as_negatives=False,
                   bias_gradient=False, offset_penalty=0.0)
    with pytest.raises(AssertionError):
        _check_no_drift(*_trained(loss), clip_run)
