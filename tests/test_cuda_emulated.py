"""The CUDA kernels' logic on the CPU, without a GPU.

The unchanged sources of csrc/cuda/ and the unchanged CUDA binding are compiled with g++
against csrc/cuda/host_emulation.h, which runs each launch block by block with the
block's threads as fibers that meet at every __syncthreads (see that header for what this
checks and what it cannot). "Device pointers" are then host pointers, so the real
``CudaBackend`` (argument setup, work buffers, binding checks) runs on CPU tensors through
the same check functions as tests/test_gpu.py uses on a GPU.

The emulation module is built once per source version into build/host_emulation/ (about
a minute); the tests skip when g++, the CUDA headers or the static CUDA runtime are missing.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import test_gpu as gpu
import torch
from op_cases import primitive_cases

import ncl_kernels as nk
import python_ref as ref
from ncl_kernels import _library
from ncl_kernels.backends import cuda as cuda_backend, registry

from conftest import STORAGE_DTYPES, cpu_routes, oracle_loss_refs, registered_backend

pytestmark = pytest.mark.slow  # the first test compiles the kernels with g++ (minutes)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = sorted((CSRC / "cuda").glob("*.cu"))
SOURCES = [*KERNELS, *sorted((CSRC / "cuda").glob("*.cuh")), CSRC / "cuda" / "host_emulation.h",
           CSRC / "common" / "ncl_math.h", CSRC / "bindings_common.h",
           CSRC / "bindings_cuda.cpp"]


def _cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "include" / "cuda_runtime.h").exists():
            return Path(cand)
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parents[1]
        if (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _build():
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    home = _cuda_home()
    if cxx is None or home is None:
        pytest.skip("needs g++ and the CUDA headers (CUDA_HOME) to emulate the kernels")
    libdir = next((d for d in (home / "lib64", home / "lib")
                   if (d / "libcudart_static.a").exists()), None)
    if libdir is None:
        pytest.skip("needs libcudart_static.a (the binding's error strings and device count)")
    import pybind11

    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wextra",
             "-Wno-unknown-pragmas", "-DNCL_HOST_EMULATION",
             "-include", str(CSRC / "cuda" / "host_emulation.h"), f"-I{CSRC}",
             f"-I{home / 'include'}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    key = hashlib.sha256(" ".join(flags).encode())
    for src in SOURCES:
        key.update(src.read_bytes())
    out_dir = ROOT / "build" / "host_emulation" / key.hexdigest()[:16]
    so = out_dir / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(".tmp")
        cmd = [cxx, *flags, "-x", "c++", *map(str, KERNELS), "-x", "none",
               str(CSRC / "bindings_cuda.cpp"), f"-L{libdir}", "-lcudart_static", "-ldl",
               "-lpthread", "-lrt", "-o", str(tmp)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        assert done.returncode == 0, "emulation build failed:\n" + done.stderr[-4000:]
        tmp.replace(so)
    spec = importlib.util.spec_from_file_location("_C_cuda", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EmulatedCudaBackend(cuda_backend.CudaBackend):
    """The CUDA backend with the emulated module, on CPU tensors (no device, no stream)."""

    name = "cuda-emulated"

    def __init__(self, module):
        self._C = module

    def _on(self, t):
        import contextlib
        return contextlib.nullcontext(0)


@pytest.fixture(scope="module")
def emu(request):
    """The emulated kernels, also declared as backend ``"cuda_emulated"`` on CPU tensors
    (the CUDA backend's declaration with another device: one run-time registration)."""
    backend = EmulatedCudaBackend(_build())
    # the slab policy wants the SM count of a device: take an H200's
    patch = pytest.MonkeyPatch()
    patch.setattr(cuda_backend._native, "sm_count", lambda device: 132)
    request.addfinalizer(patch.undo)
    with registered_backend("cuda_emulated", backend, kernels=registry.SPECS["cuda"].kernels):
        yield backend


# awkward shapes that take every path: single rows/columns, rows >= 4096 (a block per
# row, vector tail), tall-thin (col_lse over several row slabs), 1031 columns (partial
# column tile)
SHAPES = [(1, 1), (1, 7), (7, 1), (67, 45), (3, 4099), (300, 7), (7, 1031)]


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", gpu.LAYOUTS)
def test_row_and_col_lse(emu, dtype, shape, layout):
    for with_bias in (False, True):
        gpu.check_row_lse(emu, "cpu", dtype, shape, layout, with_bias)
        gpu.check_col_lse(emu, "cpu", dtype, shape, layout, with_bias)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", gpu.LAYOUTS)
def test_ncl_grad(emu, dtype, shape, layout):
    for mode in ("none", "inplace", "new", "strided_out"):
        gpu.check_ncl_grad(emu, "cpu", dtype, shape, layout, mode)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_ncl_grad_row_offset(emu, dtype):
    gpu.check_ncl_grad_row_offset(emu, "cpu", dtype)
    # chunks that span several row slabs of the kernel, targets anywhere
    gpu.check_ncl_grad_row_offset(emu, "cpu", dtype, (900, 67), targets="random")


# ncl_grad over several row slabs (384 rows or more each) and column tiles, with targets
# in all of them (the kernel maps z_j to a row of its slab and y_i to a lane's column)
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(900, 67), (450, 1031)])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
def test_ncl_grad_targets_in_every_slab_and_tile(emu, dtype, shape, layout):
    for mode in ("new", "inplace"):
        gpu.check_ncl_grad(emu, "cpu", dtype, shape, layout, mode, targets="random")


# rows that are whole multiples of every segment (no ragged last step: 256 columns, a warp
# per row; 4096, a block per row), in the vector and the element-wise layouts
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(5, 256), (2, 4096)])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
def test_rows_of_whole_segments(emu, dtype, shape, layout):
    gpu.check_row_lse(emu, "cpu", dtype, shape, layout, True)
    gpu.check_col_lse(emu, "cpu", dtype, shape, layout, True)
    gpu.check_ncl_grad(emu, "cpu", dtype, shape, layout, "new")
    gpu.check_apply_biases(emu, "cpu", dtype, shape, layout, "fg")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", gpu.LAYOUTS)
def test_apply_biases(emu, dtype, shape, layout):
    for which in ("", "fg"):
        ours = gpu.check_apply_biases(emu, "cpu", dtype, shape, layout, which)
        # rounded exactly as PyTorch rounds (s * x, + f_i, + g_j, to storage)
        torch_be = gpu.check_apply_biases("torch", "cpu", dtype, shape, layout, which)
        assert torch.equal(ours, torch_be)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_one_by_one_gradient_is_exactly_zero(emu, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S = torch.full((1, 1), 0.37, dtype=dtype)
    f, g = torch.tensor([0.25], dtype=acc), torch.tensor([-1.5], dtype=acc)
    lse_row, lse_col = emu.row_lse(S, 7.0, g), emu.col_lse(S, 7.0, f)
    half, t = torch.full((1,), 0.5, dtype=acc), torch.zeros(1, dtype=torch.int64)
    out = torch.empty_like(S)
    ds = emu.ncl_grad_(S, 7.0, f, g, lse_row, lse_col, half, half, t, t, out=out)
    assert float(ds) == 0.0 and float(out) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_misaligned_column_vectors(emu, dtype):
    gpu.check_misaligned_column_vectors(emu, "cpu", dtype)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_opcheck_every_primitive(emu, dtype):
    for name, cases in primitive_cases(dtype).items():
        for args in cases:
            torch.library.opcheck(_library.op(name, "cuda_emulated"), args)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_auto_mixes_the_cuda_kernels_with_another_backend(emu, dtype):
    """``backend="auto"``'s CUDA routes with these kernels for ``cuda`` and the torch
    backend standing in for ``triton`` (dense ``row_lse``): Sinkhorn and the loss built
    from LSEs of one backend and gradients of the other match the oracle."""
    with cpu_routes({"cuda": "cuda_emulated", "triton": "torch"}):
        _sinkhorn_and_loss_match_the_oracle(dtype)


def _sinkhorn_and_loss_match_the_oracle(dtype):
    S0 = gpu.random_scores(67, 45, dtype, seed=3)
    out = nk.sinkhorn(S0, 10.0, n_iters=10, tol=None)
    r64 = ref.sinkhorn(S0, 10.0, n_iters=10, tol=None)
    r32 = ref.sinkhorn(S0, 10.0, n_iters=10, tol=None, dtype=torch.float32)
    gpu.assert_close(out.f, r64.f, r32.f, dtype, "f")
    gpu.assert_close(out.g, r64.g, r32.g, dtype, "g")
    S = S0.clone().requires_grad_()
    loss = nk.ncl_loss(S, 12.0)
    loss.backward()
    (l64, g64), (l32, g32) = oracle_loss_refs(S0, 12.0, dtype)
    gpu.assert_close(loss.detach(), l64, l32, dtype, "loss")
    gpu.assert_close(S.grad, g64, g32, dtype, "dS")


# ---------------------------------------------------------------- the approximate exp
# The kernels' exp for float accumulation is the SFU's ex2.approx.ftz.f32 (device_utils.cuh,
# fast_exp), documented to 2 ulp. host_emulation.h models it at that bound: always +2 ulp,
# always -2 ulp, a fixed mix of -2..+2, or correctly rounded (NCL_EMU_EX2). Every result
# must stay within docs/math.md section 5 whichever way the instruction errs (the correctly
# rounded exp lies between the two biases).
EX2_MODES = ["up", "down", "hash"]


@pytest.mark.parametrize("mode", EX2_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_approximate_exp_stays_within_the_bounds(emu, monkeypatch, mode, dtype):
    monkeypatch.setenv("NCL_EMU_EX2", mode)
    # long rows (a block per row, 4099 terms per sum); tall blocks (col_lse over slabs)
    for shape in ((3, 4099), (2000, 45)):
        gpu.check_row_lse(emu, "cpu", dtype, shape, "contiguous", True)
        gpu.check_col_lse(emu, "cpu", dtype, shape, "contiguous", True)
        gpu.check_ncl_grad(emu, "cpu", dtype, shape, "aligned", "new")
    S = gpu.random_scores(300, 200, dtype, seed=9)
    out = nk.sinkhorn(S, 20.0, n_iters=20, tol=None, backend="cuda_emulated")
    r64 = ref.sinkhorn(S, 20.0, n_iters=20, tol=None)
    r32 = ref.sinkhorn(S, 20.0, n_iters=20, tol=None, dtype=torch.float32)
    gpu.assert_close(out.f, r64.f, r32.f, dtype, "f")
    gpu.assert_close(out.g, r64.g, r32.g, dtype, "g")


def test_approximate_exp_model_is_in_effect(emu, monkeypatch):
    """The bias modes move the sums the way they say (so the bound tests test something),
    and a softmax of one finite logit stays exactly 1 (ex2(0) = 1 in every mode)."""
    S, _ = gpu.scores_on("cpu", 67, 1031, torch.float32, seed=2)
    lse = {}
    for mode in ("down", "exact", "up"):
        monkeypatch.setenv("NCL_EMU_EX2", mode)
        lse[mode] = emu.row_lse(S, gpu.SCALE)
        single = torch.tensor([[0.3, float("-inf")]])
        assert float(emu.row_lse(single, gpu.SCALE)) == float(torch.tensor(0.3) * gpu.SCALE)
    # (a shift of about 2^-22 can round away in an LSE near 9, hence <= and any)
    assert (lse["down"] <= lse["exact"]).all() and (lse["exact"] <= lse["up"]).all()
    assert (lse["down"] < lse["up"]).sum() > 10
    # 2 ulp per term moves an LSE by at most about 2 * 2^-22 (+ the rounding of the LSE)
    assert float((lse["up"] - lse["down"]).abs().max()) < 2 * 2.0**-22 + 2e-6


def test_col_lse_many_slabs_matches_one_slab(emu):
    """The two-stage path (partials + merge) against the one-pass path on the same rows."""
    S, _ = gpu.scores_on("cpu", 2000, 45, torch.float32, seed=3, mask="lines")
    f = gpu.vector(2000, torch.float32, "cpu", 4)
    C = emu._C
    outs = []
    for slabs in (1, 7, 31):
        out = torch.empty(45)
        work = torch.empty(2 * slabs * 45)
        C.col_lse(s_ptr=S.data_ptr(), n=2000, m=45, row_stride=45, dtype=C.DTYPE_F32,
                  scale=7.0, f_ptr=f.data_ptr(), out_ptr=out.data_ptr(),
                  work_ptr=work.data_ptr(), n_slabs=slabs)
        outs.append(out)
    assert C.col_lse_slabs(2000, 45, C.DTYPE_F32, 132) > 1
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-6, atol=0)


def test_launch_limits_are_errors(emu):
    """A launch shape the GPU would refuse is refused (RuntimeError), not run."""
    C = emu._C
    S, out = torch.zeros(100000, 1), torch.empty(1)
    work = torch.empty(2 * 70000)
    with pytest.raises(RuntimeError, match="col_lse_cuda"):  # 70000 slabs: gridDim.y > 65535
        C.col_lse(s_ptr=S.data_ptr(), n=100000, m=1, row_stride=1, dtype=C.DTYPE_F32,
                  scale=1.0, out_ptr=out.data_ptr(), work_ptr=work.data_ptr(), n_slabs=70000)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
