"""The backend registry: declarations, ``auto``'s routes, delegation, and run-time backends.

Routing is a pure function of which backends are usable (monkeypatched here). The mixes
``auto`` builds on a GPU are checked on CPU tensors by registering CPU-capable stand-ins
for ``cuda`` and ``triton`` and routing CPU tensors through them: the public API must
then agree with the oracle and with the ``torch`` backend alone. The same mix on a GPU is
in ``tests/test_gpu.py``.
"""

from pathlib import Path

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from ncl_kernels import _library
from ncl_kernels.backends import derived, get, registry
from ncl_kernels.backends.cpu import CpuBackend
from ncl_kernels.backends.spec import ALL, DERIVED, DERIVED_FROM, FLOAT, PRIMITIVES
from ncl_kernels.backends.torch import TorchBackend

from conftest import (
    STORAGE_DTYPES,
    assert_close,
    cpu_routes,
    oracle_loss_refs,
    random_embeddings,
    random_scores,
    registered_backend,
    rel_err,
)

CPU_USABLE = nk.backends()["cpu"]["usable"]
DENSE = ("row_lse", "col_lse", "ncl_grad_", "apply_biases_", "sinkhorn_step")
STREAMING = ("row_lse_xy", "col_lse_xy", "ncl_grad_xy", "sinkhorn_step_xy",
             "target_logits_xy")


# ---------------------------------------------------------------- declarations
def test_every_backend_declares_every_primitive():
    assert set(PRIMITIVES) == set(DENSE + STREAMING)
    for name, spec in registry.SPECS.items():
        assert set(spec.kernels) == set(PRIMITIVES), f"{name} lacks an entry"
        for prim, entry in spec.kernels.items():
            # DERIVED, or the dtypes it runs itself (empty: it delegates them all)
            assert entry == DERIVED or set(entry) <= ALL, (name, prim, entry)
            if entry == DERIVED:
                assert prim in DERIVED_FROM, f"{name}: {prim} has no derivation"


def test_declared_kernels_exist_on_the_kernel_objects():
    from ncl_kernels.backends.cuda import CudaBackend
    classes = {"torch": TorchBackend, "cpu": CpuBackend, "cuda": CudaBackend}
    if registry.status("triton")[0]:
        from ncl_kernels.backends.triton.backend import TritonBackend
        classes["triton"] = TritonBackend
    for name, cls in classes.items():
        for prim, entry in registry.SPECS[name].kernels.items():
            if entry != DERIVED:
                assert callable(getattr(cls, prim, None)), f"{name} declares {prim}"


def test_every_primitive_is_an_op_with_an_overload_per_backend():
    from ncl_kernels import ops
    for name in ops.PRIMITIVE_OPS:
        packet = getattr(torch.ops.ncl_kernels, name)
        # (backends registered by other tests at run time keep their overloads: >=)
        assert set(packet.overloads()) >= {"default", *registry.names()}, name


def test_routes_cover_every_primitive_and_end_in_torch():
    for device, table in registry.ROUTES.items():
        assert set(table) == set(PRIMITIVES), device
        for order in table.values():
            assert order[-1] == "torch" and len(set(order)) == len(order)
    for order in registry.ROUTES_FLOAT64.values():
        assert order[-1] == "torch"


def test_bad_backend_names_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch'"):
        get("fast", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        nk.sinkhorn(torch.zeros(2, 2), backend=3)
    with pytest.raises(ValueError, match="'cuda' is not usable here|runs on cuda"):
        nk.ncl_loss(torch.zeros(2, 2), backend="cuda")


# ---------------------------------------------------------------- resolution
@pytest.fixture
def usable(monkeypatch):
    """``usable(names, triton_devices=("cuda",))``: pretend exactly ``names`` (and torch)
    are usable here, with Triton on the given devices."""
    def set_usable(names, triton_devices=("cuda",)):
        real_devices = registry.devices

        def status(name):
            ok = name == "torch" or name in names
            return ok, ok, "" if ok else "pretended unusable"

        def devices(name):
            return triton_devices if name == "triton" else real_devices(name)

        monkeypatch.setattr(registry, "status", status)
        monkeypatch.setattr(registry, "devices", devices)
        registry.clear_caches()
    yield set_usable
    monkeypatch.undo()
    registry.clear_caches()


def fast_routes(device="cuda"):
    return {p: registry.chosen("auto", p, device, torch.float32) for p in PRIMITIVES}


def test_routes_with_both_kernels(usable):
    usable(("cuda", "triton"))
    assert fast_routes() == {
        "row_lse": "triton", "col_lse": "cuda", "ncl_grad_": "cuda", "apply_biases_": "cuda",
        "sinkhorn_step": "cuda", "row_lse_xy": "triton", "col_lse_xy": "triton",
        "ncl_grad_xy": "cuda", "sinkhorn_step_xy": "cuda", "target_logits_xy": "triton"}


def test_routes_with_cuda_only(usable):
    usable(("cuda",))
    assert set(fast_routes().values()) == {"cuda"}


def test_routes_with_triton_only(usable):
    # ncl_grad_xy: the chunked cuBLAS + PyTorch path measured faster than Triton's kernel
    usable(("triton",))
    assert fast_routes() == {
        "row_lse": "triton", "col_lse": "triton", "ncl_grad_": "triton",
        "apply_biases_": "triton", "sinkhorn_step": "triton", "row_lse_xy": "triton",
        "col_lse_xy": "triton", "ncl_grad_xy": "torch", "sinkhorn_step_xy": "triton",
        "target_logits_xy": "triton"}


def test_routes_with_neither(usable):
    usable(())
    assert set(fast_routes().values()) == {"torch"}


@pytest.mark.parametrize("names, wide", [(("cuda", "triton"), "cuda"), (("cuda",), "cuda"),
                                         (("triton",), "torch"), ((), "torch")])
def test_float64_goes_to_cuda_never_triton(usable, names, wide):
    usable(names)
    assert {registry.chosen("auto", p, "cuda", torch.float64) for p in PRIMITIVES} == {wide}


def test_a_named_backend_delegates_what_it_does_not_run(usable):
    # Triton runs no float64: the registry hands it to its fallback, torch
    usable(("triton",))
    for prim in PRIMITIVES:
        wide = registry.chosen("triton", prim, "cuda", torch.float64)
        if registry.SPECS["triton"].kernels[prim] == DERIVED:
            # Triton's derived step: its parts are what "triton" resolves, torch for float64
            assert wide == "triton"
            assert {registry.chosen("triton", part, "cuda", torch.float64)
                    for part in DERIVED_FROM[prim]} == {"torch"}
        else:
            assert wide == "torch"
        assert registry.chosen("triton", prim, "cuda", torch.bfloat16) == "triton"


def test_interpreted_triton_is_not_used_for_cuda_tensors(usable):
    # TRITON_INTERPRET=1: triton takes CPU tensors, so it cannot serve CUDA ones
    usable(("triton",), triton_devices=("cpu",))
    assert set(fast_routes().values()) == {"torch"}
    usable(("cuda", "triton"), triton_devices=("cpu",))
    assert set(fast_routes().values()) == {"cuda"}


def test_auto_on_cpu(usable):
    expect = "cpu" if CPU_USABLE else "torch"
    assert set(fast_routes("cpu").values()) == {expect}
    usable(("cuda", "triton", "cpu"))  # GPU kernels usable: no effect on CPU tensors
    assert set(fast_routes("cpu").values()) == {"cpu"}
    usable(())
    assert set(fast_routes("cpu").values()) == {"torch"}
    assert set(fast_routes("meta").values()) == {"torch"}


def test_resolving_builds_no_kernel_object_of_an_unused_backend(monkeypatch):
    made = []
    real = registry.instance
    monkeypatch.setattr(registry, "instance", lambda name: made.append(name) or real(name))
    registry.clear_caches()
    nk.sinkhorn(torch.randn(4, 3), n_iters=2, tol=None, backend="torch")
    assert set(made) == {"torch"}
    registry.clear_caches()


def test_nothing_above_the_seam_reads_a_backend_name():
    # "auto" mixes backends; a check on a backend's name above the seam would misroute it
    root = Path(nk.__file__).parent
    for path in root.rglob("*.py"):
        if "backends" in path.parts:
            continue
        text = path.read_text()
        assert ".name ==" not in text and ".name !=" not in text, path


# ---------------------------------------------------------------- run-time backends
def test_a_backend_registered_at_run_time_gets_every_op():
    with registered_backend("plugin", TorchBackend(), devices=("cpu",)):
        assert "plugin" in nk.backends()
        for name in _library.defined():
            assert "plugin" in getattr(torch.ops.ncl_kernels, name).overloads(), name
        S = random_scores(9, 7, torch.float32, seed=2)
        ours = nk.sinkhorn(S, 5.0, n_iters=5, tol=None, backend="plugin")
        alone = nk.sinkhorn(S, 5.0, n_iters=5, tol=None, backend="torch")
        assert torch.equal(ours.f, alone.f) and torch.equal(ours.g, alone.g)
    assert "plugin" not in nk.backends()
    with pytest.raises(ValueError, match="backend must be one of"):
        nk.sinkhorn(S, backend="plugin")
    with registered_backend("plugin", TorchBackend(), devices=("cpu",)):  # again: fine
        nk.sinkhorn(S, 5.0, n_iters=1, tol=None, backend="plugin")


def test_a_declaration_missing_a_primitive_is_refused():
    spec = registry.BackendSpec(name="partial", devices=lambda: ("cpu",),
                                status=lambda: (True, True, ""), factory=TorchBackend,
                                kernels={"row_lse": ALL}, build="test")
    with pytest.raises(ValueError, match="declares no entry for"):
        registry.register(spec)


# ---------------------------------------------------------------- the mix, on CPU
class Spy:
    """A kernel object that records which primitives it was handed."""

    def __init__(self, inner, tag, log):
        self._inner, self._tag, self._log = inner, tag, log

    def __getattr__(self, attr):
        value = getattr(self._inner, attr)
        if attr in PRIMITIVES:
            def call(*args, **kwargs):
                self._log.append((self._tag, attr, args[0].dtype))
                return value(*args, **kwargs)
            return call
        return value


class WithStreaming(TorchBackend):
    """The torch backend with streaming methods of its own (a Triton-like stand-in)."""

    def row_lse_xy(self, X, Y, scale, g=None):
        return derived.row_lse_xy(self.row_lse, X, Y, scale, g)

    def col_lse_xy(self, X, Y, scale, f=None):
        return derived.col_lse_xy(self.row_lse, X, Y, scale, f)

    def ncl_grad_xy(self, *args, **kwargs):
        return derived.ncl_grad_xy(self.ncl_grad_, *args, **kwargs)


CUDA_LIKE = {**{p: ALL for p in DENSE}, **{p: DERIVED for p in STREAMING},
             "sinkhorn_step": DERIVED}
TRITON_LIKE = {**{p: FLOAT for p in PRIMITIVES}, "sinkhorn_step": DERIVED,
               "sinkhorn_step_xy": DERIVED, "target_logits_xy": DERIVED}


@pytest.fixture(scope="module")
def stand_ins():
    """``"gpu_a"`` (declared like ``cuda``: the C++ backend, or torch when it is not built)
    and ``"gpu_b"`` (declared like ``triton``: torch with streaming methods), on CPU tensors,
    each logging what it runs into the yielded list."""
    log = []
    with registered_backend("gpu_a", Spy(CpuBackend() if CPU_USABLE else TorchBackend(),
                                          "cuda", log), kernels=CUDA_LIKE), \
            registered_backend("gpu_b", Spy(WithStreaming(), "triton", log),
                               kernels=TRITON_LIKE):
        yield log


@pytest.fixture
def mixed(stand_ins):
    """``backend="auto"`` on CPU tensors takes the CUDA routes with the stand-ins in place
    of ``cuda`` and ``triton``; yields the call log (emptied)."""
    with cpu_routes({"cuda": "gpu_a", "triton": "gpu_b"}):
        stand_ins.clear()
        yield stand_ins


def routed(log):
    return {(tag, prim) for tag, prim, _ in log}


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_sinkhorn_through_the_mix(mixed, dtype):
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
def test_loss_through_the_mix(mixed, dtype, inplace):
    S0 = random_scores(131, 77, dtype, seed=3)
    S = S0.clone().requires_grad_()
    loss = nk.ncl_loss(S, 12.0, inplace_backward=inplace)
    loss.backward()
    lse_part = "cuda" if dtype == torch.float64 else "triton"
    assert routed(mixed) == {(lse_part, "row_lse"), ("cuda", "col_lse"), ("cuda", "ncl_grad_")}
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
def test_streaming_through_the_mix(mixed, monkeypatch, dtype):
    monkeypatch.setattr(derived, "CHUNK_ELEMS", 8 * 45)  # chunks of 8 rows: row offsets
    x, y = random_embeddings(60, 45, 16, dtype, seed=4)
    X, Y = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = nk.ncl_loss_embeddings(X, Y, 20.0)
    loss.backward()
    # the cuda stand-in derives its streaming primitives from its own dense kernels
    if dtype == torch.float64:
        assert routed(mixed) == {("cuda", "row_lse"), ("cuda", "ncl_grad_")}
    else:
        assert routed(mixed) == {("triton", "row_lse_xy"), ("triton", "col_lse_xy"),
                                 ("cuda", "ncl_grad_")}
    X2, Y2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    expect = nk.ncl_loss_embeddings(X2, Y2, 20.0, backend="torch")
    expect.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(loss.detach(), expect.detach()) < tol
    assert rel_err(X.grad, X2.grad) < tol and rel_err(Y.grad, Y2.grad) < tol
    if dtype != torch.bfloat16:
        assert rel_err(loss.detach(), ref.ncl_loss_embeddings(x, y, 20.0)) < 1e-5


def test_retrieval_and_apply_biases_through_the_mix(mixed):
    x, y = random_embeddings(80, 50, 16, torch.float32, seed=5)
    bias = nk.retrieval.gallery_bias(x, y, 20.0, n_iters=20, tol=None)
    assert rel_err(bias, ref.gallery_bias(x, y, 20.0, n_iters=20, tol=None)) < 1e-5
    S = random_scores(67, 45, torch.float32, seed=6)
    f, g = torch.randn(67), torch.randn(45)
    ours = nk.apply_biases_(S.clone(), 3.0, f, g)
    assert torch.equal(ours, nk.apply_biases_(S.clone(), 3.0, f, g, backend="torch"))
    assert ("cuda", "apply_biases_") in routed(mixed)
    assert {tag for tag, prim, _ in mixed if prim.endswith("_xy")} == {"triton"}


def test_kernel_set_routes_say_what_runs(mixed):
    routes = get("auto", "cpu").routes
    assert routes["row_lse"] == {"float": "gpu_b", "float64": "gpu_a"}
    assert routes["ncl_grad_xy"] == {"float": "gpu_a", "float64": "gpu_a"}
