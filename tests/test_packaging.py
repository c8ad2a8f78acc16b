"""Packaging: one version, the licence, the typing marker, the declared torch floor."""

import importlib.metadata
import re
from pathlib import Path

import pytest

import ncl_kernels as nk

from conftest import ROOT


def test_one_version():
    # pyproject.toml reads the version from ncl_kernels/__init__.py (no second copy)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject
    source = (ROOT / "ncl_kernels" / "__init__.py").read_text()
    assert f'__version__ = "{nk.__version__}"' in source
    try:
        installed = importlib.metadata.version("ncl_kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ncl_kernels is not installed as a distribution")
    assert installed == nk.__version__
    assert f"## {nk.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_licence_and_metadata():
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for field in ('license = "BSD-3-Clause"', "authors = ", "[project.urls]"):
        assert field in pyproject, field
    try:
        meta = importlib.metadata.metadata("ncl_kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ncl_kernels is not installed as a distribution")
    assert meta["License-Expression"] == "BSD-3-Clause"


def test_typed_and_torch_floor():
    assert (Path(nk.__file__).parent / "py.typed").is_file()
    floor = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert floor == "2.4"
    # what that floor is for: these are the newest torch APIs the package calls
    import torch
    for api in ("register_fake", "register_autograd", "opcheck", "get_ctx"):
        assert hasattr(torch.library, api), api
    assert hasattr(torch.compiler, "assume_constant_result")
