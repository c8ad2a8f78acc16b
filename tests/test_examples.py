"""examples/: each script runs on CPU (as a subprocess, as a user runs it) and says what it
promises. Marked slow: each takes tens of seconds on a small CPU."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name, *args):
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_open_clip_swap():
    out = _run("open_clip_swap.py")
    assert "ClipLoss (n_iters=0)" in out and "NCLClipLoss (n_iters=4)" in out
    assert "R@10" in out.splitlines()[-3]


@pytest.mark.slow
def test_ddp_train():
    out = _run("ddp_train.py")
    assert "replicas equal" in out and "queue per rank: (64, 16)" in out


@pytest.mark.slow
def test_serve_ann():
    pytest.importorskip("faiss")
    out = _run("serve_ann.py")
    assert "ncl bias" in out and "HNSW32" in out and "IVF64,Flat" in out
