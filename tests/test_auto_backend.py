"""``backend="auto"``: the CUDA routing table and the composite, checked without a GPU.

The routing is a pure function of which backends are usable (monkeypatched here). The
composite itself is checked on CPU tensors by handing it CPU-capable backend objects in
place of ``cuda`` and ``triton``: the public API then runs through a mix of backends and
must agree with the oracle and with the ``torch`` backend alone. The same composite on a
GPU, against the oracle end to end, is in ``tests/test_gpu.py``.
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from ncl_kernels.backends import auto, get
from ncl_kernels.backends.base import Backend
from ncl_kernels.backends.cpu import CpuBackend
from ncl_kernels.backends.torch import TorchBackend

from conftest import (
    STORAGE_DTYPES,
    assert_close,
    oracle_loss_refs,
    random_embeddings,
    random_scores,
    rel_err,
)

# the registry module (``ncl_kernels.backends`` the attribute is the report function)
registry = importlib.import_module("ncl_kernels.backends")
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
CPU_USABLE = nk.backends()["cpu"]["usable"]
DENSE = ("row_lse", "col_lse", "ncl_grad_", "apply_biases_")
STREAMING = ("row_lse_xy", "col_lse_xy", "ncl_grad_xy")


def fast_routes(usable):
    return {p: r["float"] for p, r in auto.plan(usable).items()}


# ---------------------------------------------------------------- the table
def test_table_covers_every_primitive_and_ends_in_torch():
    assert set(auto.ROUTES) == set(auto.PRIMITIVES) == set(DENSE + STREAMING)
    for order in (*auto.ROUTES.values(), auto.ROUTES_FLOAT64):
        assert order[-1] == "torch" and len(set(order)) == len(order)
        assert set(order) <= {"cuda", "triton", "torch"}


def test_routes_with_both_kernels():
    assert fast_routes(("cuda", "triton")) == {
        "row_lse": "triton", "col_lse": "cuda", "ncl_grad_": "cuda", "apply_biases_": "cuda",
        "row_lse_xy": "triton", "col_lse_xy": "triton", "ncl_grad_xy": "cuda"}


def test_routes_with_cuda_only():
    assert set(fast_routes(("cuda",)).values()) == {"cuda"}


def test_routes_with_triton_only():
    # ncl_grad_xy: the chunked cuBLAS + PyTorch path measured faster than Triton's kernel
    assert fast_routes(("triton",)) == {
        "row_lse": "triton", "col_lse": "triton", "ncl_grad_": "triton",
        "apply_biases_": "triton", "row_lse_xy": "triton", "col_lse_xy": "triton",
        "ncl_grad_xy": "torch"}


def test_routes_with_neither():
    assert set(fast_routes(()).values()) == {"torch"}


@pytest.mark.parametrize("usable, wide", [(("cuda", "triton"), "cuda"), (("cuda",), "cuda"),
                                          (("triton",), "torch"), ((), "torch")])
def test_float64_goes_to_cuda_never_triton(usable, wide):
    # triton only hands float64 to its torch parent: it is never picked for float64
    assert {r["float64"] for r in auto.plan(usable).values()} == {wide}


def test_part_picks_by_storage_dtype():
    be = auto.AutoBackend(("cuda", "triton"), lambda name: name)  # names stand in for objects
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert be.part("row_lse", dtype) == "triton"
        assert be.part("col_lse", dtype) == "cuda"
    assert be.part("row_lse", torch.float64) == "cuda"
    assert be.part("row_lse_xy", torch.float64) == "cuda"


# ---------------------------------------------------------------- the registry
@pytest.fixture
def usable(monkeypatch):
    """``usable(names, triton_devices="cuda")``: pretend exactly ``names`` (and torch) are
    usable, with an empty instance cache."""
    def set_usable(names, triton_devices="cuda"):
        def status(name):
            ok = name == "torch" or name in names
            return ok, ok, "" if ok else "pretended unusable"
        monkeypatch.setattr(registry, "_status", status)
        monkeypatch.setattr(registry._triton, "devices", lambda: triton_devices)
        monkeypatch.setattr(registry, "_instances", {})
    return set_usable


@pytest.mark.parametrize("names", [("cuda",), ("triton",), ("cuda", "triton")])
def test_auto_on_cuda_is_the_composite_built_without_a_gpu(usable, monkeypatch, names):
    usable(names)
    made = []
    monkeypatch.setattr(registry, "_instance", lambda name: made.append(name))
    be = get("auto", CUDA)
    assert isinstance(be, auto.AutoBackend) and be.name == "auto"
    assert be.routes == auto.plan(names)
    assert made == []  # parts come on first use
    assert get("auto", CUDA) is be  # one composite per set of usable backends


def test_auto_on_cuda_without_kernels_is_torch(usable):
    usable(())
    be = get("auto", CUDA)
    assert type(be) is TorchBackend


def test_interpreted_triton_is_not_used_for_cuda_tensors(usable):
    # TRITON_INTERPRET=1: triton takes CPU tensors, so it cannot serve CUDA ones
    usable(("triton",), triton_devices="cpu")
    assert type(get("auto", CUDA)) is TorchBackend
    usable(("cuda", "triton"), triton_devices="cpu")
    assert get("auto", CUDA).routes == auto.plan(("cuda",))


def test_auto_on_cuda_here_needs_no_gpu():
    be = get("auto", CUDA)  # whatever is usable here; constructing it launches nothing
    assert isinstance(be, Backend)
    if not torch.cuda.is_available():
        assert type(be) is TorchBackend


def test_auto_on_cpu_is_unchanged(usable, monkeypatch):
    expect = "cpu" if CPU_USABLE else "torch"
    assert get("auto", CPU).name == expect
    usable(("cuda", "triton", "cpu"))  # GPU kernels usable: no effect on CPU tensors
    monkeypatch.setattr(registry, "_instance", lambda name: name)
    assert get("auto", CPU) == expect
    monkeypatch.setattr(registry._cpu, "status", lambda: (False, False, "gone"))
    assert get("auto", CPU) == "torch"
    assert get("auto", torch.device("meta")) == "torch"


def test_nothing_above_the_seam_reads_a_backend_name():
    # the composite is named "auto"; a check on be.name above the seam would misroute it
    root = Path(nk.__file__).parent
    for path in root.rglob("*.py"):
        if "backends" in path.parts:
            continue
        assert ".name ==" not in path.read_text() and ".name !=" not in path.read_text(), path


# ---------------------------------------------------------------- the composite, on CPU
class Spy:
    """A backend object that records which primitives it was handed."""

    def __init__(self, inner, tag, log):
        self._inner, self._tag, self._log = inner, tag, log

    def __getattr__(self, attr):
        value = getattr(self._inner, attr)
        if attr in auto.PRIMITIVES:
            def call(*args, **kwargs):
                self._log.append((self._tag, attr, args[0].dtype))
                return value(*args, **kwargs)
            return call
        return value


def use_as_auto(monkeypatch, composite):
    """Make ``backend="auto"`` resolve to ``composite`` whatever the tensors' device."""
    real = registry.get

    def get_backend(name, device):
        return composite if name == "auto" else real(name, device)

    # every module above the seam imported ``get`` as ``get_backend``
    patched = 0
    for mod in list(sys.modules.values()):
        if (getattr(mod, "__name__", "").startswith("ncl_kernels")
                and getattr(mod, "get_backend", None) is real):
            monkeypatch.setattr(mod, "get_backend", get_backend)
            patched += 1
    assert patched >= 4  # sinkhorn, _ops, loss, retrieval


@pytest.fixture
def mixed(monkeypatch):
    """``backend="auto"`` on CPU tensors becomes a composite whose ``cuda`` part is the C++
    backend (torch when it is not built) and whose ``triton`` part is the torch backend;
    yields the call log."""
    log = []
    parts = {"cuda": Spy(CpuBackend() if CPU_USABLE else TorchBackend(), "cuda", log),
             "triton": Spy(TorchBackend(), "triton", log),
             "torch": Spy(TorchBackend(), "torch", log)}
    use_as_auto(monkeypatch, auto.AutoBackend(("cuda", "triton"), parts.__getitem__))
    return log


def routed(log):
    return {(tag, prim) for tag, prim, _ in log}


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_sinkhorn_through_the_composite(mixed, dtype):
    S = random_scores(67, 45, dtype, seed=1, strided=True)
    ours = nk.sinkhorn(S, 10.0, n_iters=10, tol=None)
    if dtype == torch.float64:
        assert routed(mixed) == {("cuda", "row_lse"), ("cuda", "col_lse")}
    else:
        assert routed(mixed) == {("triton", "row_lse"), ("cuda", "col_lse")}
    r64 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None)
    r32 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None, dtype=torch.float32)
    assert_close(ours.f, r64.f, r32.f, dtype, "f")
    assert_close(ours.g, r64.g, r32.g, dtype, "g")
    alone = nk.sinkhorn(S, 10.0, n_iters=10, tol=None, backend="torch")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(ours.f, alone.f) < tol and rel_err(ours.g, alone.g) < tol


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_loss_through_the_composite(mixed, dtype, inplace):
    S0 = random_scores(131, 77, dtype, seed=3)
    S = S0.clone().requires_grad_()
    loss = nk.ncl_loss(S, 12.0, inplace_backward=inplace)
    loss.backward()
    grad_part = "cuda"
    lse_part = "cuda" if dtype == torch.float64 else "triton"
    assert routed(mixed) == {(lse_part, "row_lse"), ("cuda", "col_lse"),
                             (grad_part, "ncl_grad_")}
    (l64, g64), (l32, g32) = oracle_loss_refs(S0, 12.0, dtype)
    assert_close(loss.detach(), l64, l32, dtype, "loss")
    assert_close(S.grad, g64, g32, dtype, "dS")
    alone = S0.clone().requires_grad_()
    expect = nk.ncl_loss(alone, 12.0, backend="torch")
    expect.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(loss.detach(), expect.detach()) < tol
    if dtype in (torch.float32, torch.float64):  # low precision: rounding of G may differ
        assert rel_err(S.grad, alone.grad) < tol


def test_one_by_one_gradient_is_exactly_zero_across_parts(mixed):
    """LSEs from one backend and the gradient from another still give G = 0 exactly on a
    1 x 1 block: every backend rounds the logits alike."""
    S = torch.full((1, 1), 0.37).requires_grad_()
    nk.ncl_loss(S, 7.0).backward()
    assert routed(mixed) >= {("triton", "row_lse"), ("cuda", "ncl_grad_")}
    assert float(S.grad) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_streaming_through_the_composite(mixed, monkeypatch, dtype):
    monkeypatch.setattr(Backend, "chunk_elems", 8 * 45)  # chunks of 8 rows: row offsets
    x, y = random_embeddings(60, 45, 16, dtype, seed=4)
    X, Y = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = nk.ncl_loss_embeddings(X, Y, 20.0)
    loss.backward()
    lse_part = "cuda" if dtype == torch.float64 else "triton"
    grad_part = "cuda"
    assert routed(mixed) == {(lse_part, "row_lse_xy"), (lse_part, "col_lse_xy"),
                             (grad_part, "ncl_grad_xy")}
    X2, Y2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    expect = nk.ncl_loss_embeddings(X2, Y2, 20.0, backend="torch")
    expect.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(loss.detach(), expect.detach()) < tol
    assert rel_err(X.grad, X2.grad) < tol and rel_err(Y.grad, Y2.grad) < tol
    if dtype != torch.bfloat16:
        assert rel_err(loss.detach(), ref.ncl_loss_embeddings(x, y, 20.0)) < 1e-5


def test_retrieval_and_apply_biases_through_the_composite(mixed):
    x, y = random_embeddings(80, 50, 16, torch.float32, seed=5)
    bias = nk.retrieval.gallery_bias(x, y, 20.0, n_iters=20, tol=None)
    assert rel_err(bias, ref.gallery_bias(x, y, 20.0, n_iters=20, tol=None)) < 1e-5
    S = random_scores(67, 45, torch.float32, seed=6)
    f, g = torch.randn(67), torch.randn(45)
    ours = nk.apply_biases_(S.clone(), 3.0, f, g)
    assert torch.equal(ours, nk.apply_biases_(S.clone(), 3.0, f, g, backend="torch"))
    assert ("cuda", "apply_biases_") in routed(mixed)
    assert {tag for tag, prim, _ in mixed if prim.endswith("_xy")} == {"triton"}
