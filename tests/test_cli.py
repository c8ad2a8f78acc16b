"""The command lines: python -m ncl_kernels (usage, the backends report) and the demo's
--threads flag."""

import subprocess
import sys

import pytest
import torch

from conftest import child_env


def test_help_prints_usage(capsys):
    from ncl_kernels.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("usage: python -m ncl_kernels")
    assert "--threads" in out and "R@1" not in out


@pytest.mark.slow
def test_help_as_a_user_types_it():
    proc = subprocess.run([sys.executable, "-m", "ncl_kernels", "--help"], capture_output=True,
                          text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m ncl_kernels")


def test_backends_report_and_version(capsys, monkeypatch):
    import ncl_kernels as nk
    from ncl_kernels.__main__ import main
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert main(["--backends", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "R@1" not in out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and nk.__version__ in capsys.readouterr().out


def test_bad_thread_counts_are_refused(capsys):
    from ncl_kernels.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(["--threads", "0"])
    assert info.value.code == 2 and "--threads must be >= 1" in capsys.readouterr().err
    pytest.importorskip("tqdm")
    from ncl_kernels.train import main as demo
    with pytest.raises(SystemExit) as info:
        demo(["--threads", "0"])
    assert info.value.code == 2 and "--threads must be >= 1" in capsys.readouterr().err


def test_demo_threads_flag_sets_torch_threads(monkeypatch):
    from ncl_kernels.train import cli
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setattr(cli, "_device", lambda p, name: p.error("stop here"))
    with pytest.raises(SystemExit):
        cli.main(["--threads", "1"])
    assert seen == [1]


def test_small_passes_run_on_one_thread(monkeypatch):
    from ncl_kernels.backends import cpu
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert cpu.threads_for(torch.empty(8, 8)) == 1
    assert cpu.threads_for(torch.empty(1024, 1024)) == 7
    monkeypatch.setattr(cpu, "SMALL_ELEMENTS", 0)
    assert cpu.threads_for(torch.empty(8, 8)) == 7
