"""The Triton kernels compiled for sm_90a (H100/H200) on a machine without a GPU.

The interpreter lane (test_triton.py) checks the kernels' arithmetic, not what the GPU
compiler makes of them. Here the backend's own launchers run on CPU tensors with every
kernel replaced by a recorder, so each launch is captured with the very blocks, dtypes,
constexprs and argument specializations (Triton's own ``specialize_impl``) that a GPU run
would use; each is compiled by ``triton.compile`` for ``sm_90a`` and its PTX assembled
with ``ptxas -v`` (the one Triton ships). Budgets:

* no register spills in the hot kernels (streaming LSE passes, fused step, gradient
  kernels, dense passes at the shipped configurations);
* shared memory within the 227 KB a block may have on sm_90;
* the streaming and gradient kernels' products on tensor cores (``wgmma``/``mma`` in the
  PTX, no dot left to the FMA units in the TTGIR).

Skips, with the reason, where Triton, its NVIDIA backend or ptxas is unavailable.

    python tests/test_triton_sm90.py      # the table: registers, spills, shared memory, MMA
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, NamedTuple

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed"),
              pytest.mark.skipif(INTERP, reason="compiles the kernels, not interpreted"),
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="a GPU compiles the kernels for real (run this module "
                                        "as a script there for the table)")]

SMEM_LIMIT = 227 * 1024          # dynamic shared memory a block may have on sm_90
TENSOR_CORE = re.compile(r"\b(wgmma\.mma_async|mma\.sync)")


class Launch(NamedTuple):
    case: str
    fn: object           # the JITFunction
    args: tuple
    kwargs: dict


class Compiled(NamedTuple):
    case: str
    kernel: str
    registers: int
    spill_bytes: int
    shared: int
    tensor_core: bool
    fma_dot: bool


def _toolchain():
    """``(make_backend, GPUTarget, specialize, ptxas path)`` or a skip with the reason."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import native_specialize_impl
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"this Triton lacks what the offline compile needs ({exc})")
    try:
        ptxas = get_ptxas(90).path
    except TypeError:                     # older Triton: get_ptxas() takes no arch
        ptxas = get_ptxas().path
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("Triton's ptxas is not available")
    return make_backend, GPUTarget, native_specialize_impl, ptxas


def record_launches() -> List[Launch]:
    """Every kernel launch the backend makes for the cases below, captured, not run."""
    from ncl_kernels.backends.triton import backend as B, dense, grad, streaming

    launches: List[Launch] = []
    case = [""]

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(Launch(case[0], self.fn, a, k))

    mods = (dense, streaming, grad)
    saved = {(m, n): getattr(m, n) for m in mods for n in dir(m)
             if type(getattr(m, n)).__name__ == "JITFunction" and n.endswith("_kernel")}
    for (m, n), fn in saved.items():
        setattr(m, n, Recorder(fn))
    try:
        be = B.TritonBackend()
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            tag = str(dt)[6:]
            S = torch.empty(4096, 4096, dtype=dt)
            v = torch.zeros(4096)
            ids = torch.zeros(4096, dtype=torch.int64)
            case[0] = f"dense {tag}"
            be.row_lse(S, 1.0, v)
            be.col_lse(S, 1.0, v)
            be.ncl_grad_(S, 1.0, v, v, v, v, v, v, ids, ids, out=torch.empty_like(S))
            be.apply_biases_(S, 1.0, v, v)
            for d in ((512, 1024, 256, 64) if dt != torch.float32 else (512, 128)):
                X = torch.empty(4096, d, dtype=dt)
                case[0] = f"stream {tag} D={d}"
                be.row_lse_xy(X, X, 1.0, v)
                be.col_lse_xy(X, X, 1.0, v)
                be.sinkhorn_step_xy(X, X, 1.0, v, v)
                be.target_logits_xy(X, X, 1.0, ids, ids)
                be.ncl_grad_xy(X, X, 1.0, v, v, v, v, v, v, ids, ids)
                be.ncl_grad_xy(X, X, 1.0, v, v, v, v, v, v, ids, ids, need_dx=False,
                               need_dy=False)
    finally:
        for (m, n), fn in saved.items():
            setattr(m, n, fn)
    return launches


_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")


def compile_launch(launch: Launch, tools) -> Compiled:
    make_backend, GPUTarget, specialize, ptxas = tools
    import triton
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = launch.fn
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTIONS}
    bound = dict(zip(fn.arg_names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k not in _OPTIONS})
    signature: Dict[str, str] = {}
    constexprs: Dict[str, object] = {}
    attrs = {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        ty, spec = specialize(backend, value, False, not param.do_not_specialize,
                              not param.do_not_specialize_on_alignment)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options)
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    ttgir = kernel.asm["ttgir"]
    # a dot whose result lives in a plain blocked layout is an FMA dot (no tensor cores)
    fma_dot = bool(re.search(r"tt\.dot .*-> tensor<[^>]*#blocked", ttgir))
    return Compiled(launch.case, fn.__name__, regs, spills, kernel.metadata.shared,
                    bool(TENSOR_CORE.search(ptx)), fma_dot)


HOT = ("row_lse_xy_kernel", "col_lse_xy_kernel", "sinkhorn_step_xy_kernel",
       "grad_dx_kernel", "grad_dy_kernel", "row_lse_kernel", "col_lse_kernel",
       "ncl_grad_kernel")
MMA = ("row_lse_xy_kernel", "col_lse_xy_kernel", "sinkhorn_step_xy_kernel",
       "target_logits_xy_kernel", "grad_dx_kernel", "grad_dy_kernel")


QUICK = {"bfloat16": ("row_lse_kernel", "col_lse_kernel", "ncl_grad_kernel",
                      "row_lse_xy_kernel", "col_lse_xy_kernel", "sinkhorn_step_xy_kernel",
                      "grad_dx_kernel", "grad_dy_kernel"),
         "float32": ("row_lse_xy_kernel", "grad_dx_kernel")}


def _quick(launch: Launch) -> bool:
    """CI's set (about a minute): the hot kernels in bfloat16 and the float32 streaming
    ones, streaming at D = 512; everything else is in the slow test."""
    kind, dtype = launch.case.split()[:2]
    return (launch.fn.__name__ in QUICK.get(dtype, ())
            and (kind == "dense" or launch.case.endswith("D=512"))
            and launch.kwargs.get("WRITE", True))


def _selected(launches: List[Launch], quick: bool) -> List[Launch]:
    """The quick set (CI): bfloat16 and float32, every kernel once; the rest is slow."""
    seen, out = set(), []
    for la in launches:
        key = (la.case, la.fn.__name__, tuple(sorted((k, str(v)) for k, v in la.kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        if quick and not _quick(la):
            continue
        out.append(la)
    return out


def _check(results: List[Compiled]):
    bad = []
    for r in results:
        if r.shared > SMEM_LIMIT:
            bad.append(f"{r.case} {r.kernel}: {r.shared} B of shared memory")
        if r.kernel in HOT and r.spill_bytes:
            bad.append(f"{r.case} {r.kernel}: spills {r.spill_bytes} B")
        if r.kernel in MMA and (not r.tensor_core or r.fma_dot):
            bad.append(f"{r.case} {r.kernel}: a dot off the tensor cores")
    assert not bad, "\n".join(bad)


def test_kernels_compile_for_sm90a_within_budgets():
    tools = _toolchain()
    _check([compile_launch(la, tools) for la in _selected(record_launches(), quick=True)])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NCL_SM90_ALL") != "1",
                    reason="every kernel and width (minutes): set NCL_SM90_ALL=1")
def test_float16_and_wide_d_compile_for_sm90a_within_budgets():
    tools = _toolchain()
    rest = [la for la in _selected(record_launches(), quick=False)
            if not _quick(la)]
    _check([compile_launch(la, tools) for la in rest])


if __name__ == "__main__":
    if INTERP:
        sys.exit("compiles the kernels: run without TRITON_INTERPRET")
    tools = _toolchain()
    print("| case | kernel | registers | spills (B) | shared (B) | tensor cores |")
    print("|---|---|---:|---:|---:|---|")
    for la in _selected(record_launches(), quick="--all" not in sys.argv[1:]):
        r = compile_launch(la, tools)
        print(f"| {r.case} | {r.kernel} | {r.registers} | {r.spill_bytes} | {r.shared} | "
              f"{'yes' if r.tensor_core and not r.fma_dot else 'NO'} |", flush=True)
