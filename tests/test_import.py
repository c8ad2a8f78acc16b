"""The package imports and works without its compiled modules; backends() says why."""

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, child_env


def test_backends_report_shape():
    import ncl_kernels as nk
    report = nk.backends()
    assert set(report) == {"torch", "cpu", "cuda", "triton"}
    for name, info in report.items():
        assert set(info) == {"built", "usable", "devices", "why", "build"}
        assert info["usable"] or info["why"], f"{name}: not usable but no reason given"
    assert report["torch"]["usable"]


def test_import_without_compiled_modules():
    # Block the compiled modules as a missing build would, then use the package.
    code = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name in ("ncl_kernels._C_cpu", "ncl_kernels._C_cuda"):
                    raise ImportError(f"blocked {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch, ncl_kernels as nk
        report = nk.backends()
        assert not report["cpu"]["usable"] and "blocked" in report["cpu"]["why"], report
        assert not report["cuda"]["usable"]
        out = nk.sinkhorn(torch.randn(5, 4), n_iters=3, tol=None)   # auto -> torch
        assert torch.isfinite(out.f).all()
        try:
            nk.sinkhorn(torch.randn(5, 4), backend="cpu")
        except ValueError as exc:
            assert "not usable" in str(exc) and "blocked" in str(exc)
        else:
            raise AssertionError("backend='cpu' should have been refused")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(ROOT / "tests"), env=child_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.slow
def test_python_dash_m_example_runs():
    done = subprocess.run([sys.executable, "-m", "ncl_kernels"], capture_output=True,
                          text=True, cwd=str(ROOT / "tests"), env=child_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    for word in ("torch", "usable", "R@1", "ncl", "qbnorm"):
        assert word in done.stdout
