"""Shared fixtures: the oracle on the path, the backends to test, tolerance helpers."""

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

# python_ref (the float64 oracle) lives at the repository root and is not installed;
# append (not prepend) so that `import ncl_kernels` still finds the installed package.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import ncl_kernels  # noqa: E402
from ncl_kernels import _materialize  # noqa: E402

_REAL_BUDGET = _materialize.DEFAULT_BUDGET

STORAGE_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def pytest_report_header(config):
    usable = {k: v["usable"] for k, v in ncl_kernels.backends().items()}
    return [f"ncl_kernels from {Path(ncl_kernels.__file__).parent}", f"backends: {usable}"]


def pytest_configure(config):
    # CI sets NCL_REQUIRE_CPU=1: a missing C++ module is then a failure, not a skip.
    if os.environ.get("NCL_REQUIRE_CPU") == "1":
        info = ncl_kernels.backends()["cpu"]
        if not info["usable"]:
            raise pytest.UsageError(f"NCL_REQUIRE_CPU=1 but the cpu backend is not usable: "
                                    f"{info['why']}")


def child_env(**extra):
    """Environment for a child Python that imports the very ncl_kernels this session did."""
    return dict(os.environ, PYTHONPATH=str(Path(ncl_kernels.__file__).parents[1]), **extra)


# Peak-memory probes for child processes. getrusage's ru_maxrss is carried over from the
# parent across fork and exec (a child of a large pytest process reports the parent's peak),
# so the children read VmHWM, which belongs to their own address space, after resetting it
# to the current RSS through /proc/self/clear_refs (Linux >= 4.0).
PEAK_RSS_CODE = """
def _status_kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS")

def peak():
    return _status_kib("VmHWM")
"""


def cpu_backends():
    """Every declared backend usable on CPU tensors here (the Triton interpreter lane and
    the CUDA host emulation run the same suites in their own processes and fixtures)."""
    from ncl_kernels.backends import registry
    return [name for name in registry.names() if registry.runs_on(name, "cpu")]


@pytest.fixture(params=cpu_backends())
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _stream_by_default(monkeypatch):
    """The embedding forms stream unless a test asks otherwise: most suites here check the
    streaming kernels, which the cost model would skip on small CPU problems (it forms S
    once when that is faster). Tests of that choice use ``real_materialize_policy``."""
    monkeypatch.setattr(_materialize, "DEFAULT_BUDGET", 0)


@pytest.fixture
def real_materialize_policy(monkeypatch):
    monkeypatch.setattr(_materialize, "DEFAULT_BUDGET", _REAL_BUDGET)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force every chunked primitive through many chunks on small inputs."""
    from ncl_kernels.backends import derived
    monkeypatch.setattr(derived, "CHUNK_ELEMS", 97)


@contextlib.contextmanager
def registered_backend(name, obj, *, kernels=None, devices=("cpu",)):
    """Declare ``obj`` as backend ``name`` on ``devices`` for the duration (the run-time
    registration a plug-in would use); ``kernels`` defaults to the torch backend's table."""
    from ncl_kernels import _library
    from ncl_kernels.backends import registry

    spec = registry.BackendSpec(
        name=name, devices=lambda: devices, status=lambda: (True, True, ""),
        factory=lambda: obj, kernels=kernels or registry.SPECS["torch"].kernels,
        build="registered by a test")
    registry.register(spec)
    try:
        yield spec
    finally:
        _library.remove_backend(name)


@contextlib.contextmanager
def cpu_routes(rename):
    """``backend="auto"`` on CPU tensors takes the CUDA routes, each backend name mapped
    through ``rename`` (e.g. to CPU stand-ins for ``cuda`` and ``triton``)."""
    from ncl_kernels.backends import registry

    table = {p: tuple(dict.fromkeys(rename.get(b, b) for b in order))
             for p, order in registry.ROUTES["cuda"].items()}
    wide = tuple(dict.fromkeys(rename.get(b, b) for b in registry.ROUTES_FLOAT64["cuda"]))
    saved = registry.ROUTES["cpu"], registry.ROUTES_FLOAT64["cpu"]
    registry.ROUTES["cpu"], registry.ROUTES_FLOAT64["cpu"] = table, wide
    registry.clear_caches()
    try:
        yield
    finally:
        registry.ROUTES["cpu"], registry.ROUTES_FLOAT64["cpu"] = saved
        registry.clear_caches()


def rel_err(a, b):
    """Norm-wise relative error of ``a`` against ``b`` over their finite entries."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "-inf entries differ"
    keep = torch.isfinite(b)
    assert torch.isfinite(a[keep]).all(), "non-finite value where the reference is finite"
    a, b = a[keep], b[keep]
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_close(ours, ref64, ref32, dtype, what=""):
    """docs/math.md section 5 tolerances for storage ``dtype``."""
    err = rel_err(ours, ref64)
    if dtype == torch.float64:
        bound = 1e-10
    elif dtype == torch.float32:
        bound = 1e-5
    else:
        bound = 2 * rel_err(ref32, ref64) + 1e-6
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g} ({dtype})"


def oracle_loss_refs(S0, scale, dtype):
    """The oracle's NCL loss and dloss/dS for CPU scores ``S0``, as assert_close's two
    references: ``((loss64, dS64), (loss32, dS32))``, the second in the storage dtype with
    float32 accumulation."""
    import python_ref as ref

    refs = []
    for ref_dtype in (torch.float64, torch.float32):
        leaf = S0.to(torch.float64 if ref_dtype == torch.float64 else dtype, copy=True)
        leaf.requires_grad_()
        value = ref.ncl_loss(leaf, scale, dtype=ref_dtype)
        value.backward()
        refs.append((value.detach(), leaf.grad))
    return refs


def random_scores(n, m, dtype, *, seed=0, strided=False, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # a view of a wider matrix: row stride m + 13
        return (torch.randn(n, m + 13, generator=gen) * scale).to(dtype)[:, :m]
    return (torch.randn(n, m, generator=gen) * scale).to(dtype)


def random_embeddings(n, m, d, dtype, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    return x.to(dtype), y.to(dtype)
