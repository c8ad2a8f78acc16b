"""Resource budgets of the CUDA kernels on Hopper, checked without a GPU.

The PTX that the build embedded in the installed ``_C_cuda`` (CMake compiles every kernel
to PTX for compute_90 beside the SASS) is assembled again with ``ptxas -arch=sm_90a -v``,
so the test reuses the build's compilation and costs one ptxas run (cached by the PTX's
hash under build/ptxas/); where the PTX cannot be extracted (no cuobjdump, or a build
without compute_90), the sources are compiled to PTX with nvcc instead. It checks, for
every kernel:

- no spills and no stack frame (local memory);
- registers within the kernel's budget: the streaming passes over S in float accumulation
  (row_lse, col_lse, apply_biases) fit 4 blocks of 256 threads per SM (64 registers), 3
  on the element-wise path of misaligned rows (80); the gradient, float64 and the small
  merge kernels 2 blocks (128). These are the ``__launch_bounds__`` of csrc/cuda/, stated
  here once more so that a change to either is seen;
- static shared memory within the 227 KB a block may have, and within an SM's 228 KB for
  the blocks per SM of its budget;
- the hot kernels in float accumulation use the approximate exp (ex2.approx.ftz.f32), and
  those on aligned rows 16-byte streaming loads (ld.global.cs.v4).

Skipped where nvcc (and its ptxas) is not installed or the CUDA module was not built.
"""

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SMEM_PER_BLOCK = 227 * 1024
SMEM_PER_SM = 228 * 1024
REGS_PER_SM = 65536
THREADS = 256
FILES = ("row_lse", "col_lse", "ncl_grad", "apply_biases")


# ---------------------------------------------------------------- tools
def _cuda_bin():
    nvcc = shutil.which("nvcc")
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            nvcc = str(Path(cand) / "bin" / "nvcc")
    if nvcc is None:
        return None
    return Path(nvcc).resolve().parent


def _cuobjdump(cuda_bin):
    found = shutil.which("cuobjdump") or (
        str(cuda_bin / "cuobjdump") if (cuda_bin / "cuobjdump").exists() else None)
    if found:
        return found
    spec = importlib.util.find_spec("triton")  # Triton's wheel carries one
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    return None


def _built_module():
    try:
        spec = importlib.util.find_spec("ncl_kernels._C_cuda")
    except ImportError:
        return None
    return Path(spec.origin) if spec and spec.origin else None


def _ptx_from_build(cuobjdump, module, out):
    """The compute_90 PTX of each kernel file embedded in the module, or None."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([cuobjdump, "-xptx", "all", str(module)], cwd=out,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    found = {}
    for name in FILES:
        hits = sorted(out.glob(f"{name}*.sm_90*.ptx"))
        if not hits:
            return None
        found[name] = hits[0]
    return found


def _ptx_from_sources(cuda_bin, out):
    """Compile the kernel sources to compute_90a PTX (the build's flags)."""
    out.mkdir(parents=True, exist_ok=True)

    def one(name):
        ptx = out / f"{name}.ptx"
        cmd = [str(cuda_bin / "nvcc"), "-ptx", "-arch=compute_90a", "-O3", "-std=c++17",
               f"-I{CSRC}", str(CSRC / "cuda" / f"{name}.cu"), "-o", str(ptx)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        return name, ptx

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(pool.map(one, FILES))


def _ptxas_report(ptxas, ptx, cache):
    """ptxas -v's report for one PTX file (cached by its content)."""
    text = ptx.read_bytes()
    key = hashlib.sha256(text + b"sm_90a -O3").hexdigest()[:16]
    report = cache / f"{ptx.stem}.{key}.txt"
    if not report.exists():
        done = subprocess.run([ptxas, "-arch=sm_90a", "-O3", "-v", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        report.write_text(done.stdout + done.stderr)
    return report.read_text()


# ---------------------------------------------------------------- parsing
ENTRY = re.compile(
    r"Compiling entry function '(?P<name>\w+)' for 'sm_90a'\n"
    r"(?:ptxas info\s*: Function properties for \w+\n"
    r"\s*(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
    r"(?P<ld>\d+) bytes spill loads\n)?"
    r"ptxas info\s*: Used (?P<regs>\d+) registers[^\n]*?(?:, (?P<smem>\d+) bytes smem)?\n")
# the template arguments of this library's kernels, as the Itanium ABI mangles them
ARG = re.compile(r"NS_6bf16_tE|NS_5f16_tE|f|d|Li(-?\d+)E|Lb([01])E")
STORAGE = {"NS_6bf16_tE": "bf16", "NS_5f16_tE": "f16", "f": "float", "d": "double"}


def parse_name(mangled):
    """``(kernel, [template arguments])``, e.g. ``("row_lse_kernel", ["bf16", "float", 8,
    True, True])``."""
    m = re.search(r"([a-z_]+_kernel)I(.*?)EEv", mangled)
    assert m, mangled
    args, rest = [], m.group(2)
    while rest:
        a = ARG.match(rest)
        assert a, (mangled, rest)
        tok = a.group(0)
        if tok in STORAGE:
            args.append(STORAGE[tok])
        elif a.group(1) is not None:
            args.append(int(a.group(1)))
        else:
            args.append(a.group(2) == "1")
        rest = rest[len(tok):]
    return m.group(1), args


def ptx_entries(ptx_text):
    """``{mangled name: PTX body}``."""
    parts = re.split(r"(?:\.visible\s+)?\.entry\s+(\w+)\(", ptx_text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# ---------------------------------------------------------------- budgets
STREAMING = ("row_lse_kernel", "col_lse_kernel", "apply_biases_kernel")


def blocks_per_sm(kernel, args):
    """The blocks of 256 threads per SM each kernel's register budget is set for."""
    if kernel in STREAMING and args[0] != "double":
        vec = args[2] if kernel == "col_lse_kernel" else args[3]
        return 4 if vec else 3
    return 2


def register_budget(kernel, args):
    # registers are allocated per warp in units of 256: 3 blocks of 256 threads leave 80
    per_thread = REGS_PER_SM // (blocks_per_sm(kernel, args) * THREADS)
    return per_thread // 8 * 8


@pytest.fixture(scope="module")
def kernels():
    cuda_bin = _cuda_bin()
    if cuda_bin is None or not (cuda_bin / "ptxas").exists():
        pytest.skip("needs nvcc and ptxas (the CUDA toolkit)")
    module = _built_module()
    cache = ROOT / "build" / "ptxas"
    ptx = None
    cuobjdump = _cuobjdump(cuda_bin)
    if module is not None and cuobjdump is not None:
        ptx = _ptx_from_build(cuobjdump, module, cache / "ptx")
    if ptx is None:
        ptx = _ptx_from_sources(cuda_bin, cache / "src")
    cache.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        reports = list(pool.map(lambda p: _ptxas_report(str(cuda_bin / "ptxas"), p, cache),
                                ptx.values()))
    found = {}
    for (name, path), report in zip(ptx.items(), reports):
        bodies = ptx_entries(path.read_text())
        for m in ENTRY.finditer(report):
            kernel, args = parse_name(m.group("name"))
            found[m.group("name")] = {
                "file": name, "kernel": kernel, "args": args, "regs": int(m.group("regs")),
                "stack": int(m.group("stack") or 0), "spill": int(m.group("st") or 0)
                + int(m.group("ld") or 0), "smem": int(m.group("smem") or 0),
                "ptx": bodies.get(m.group("name"), "")}
        assert bodies, f"no kernels in {path}"
    return found


def test_every_kernel_is_there(kernels):
    seen = {(k["kernel"], k["args"][0]) for k in kernels.values()}
    for kernel in ("row_lse_kernel", "col_lse_kernel", "ncl_grad_kernel", "apply_biases_kernel"):
        for storage in ("float", "double", "bf16", "f16"):
            assert (kernel, storage) in seen, (kernel, storage)
    for kernel in ("col_lse_merge_kernel", "sum_partials_kernel"):
        assert (kernel, "float") in seen and (kernel, "double") in seen


def _describe(k):
    return f"{k['kernel']}<{', '.join(map(str, k['args']))}>"


def test_no_spills_and_no_stack(kernels):
    bad = [f"{_describe(k)}: {k['spill']} bytes spilled, {k['stack']} bytes of stack"
           for k in kernels.values() if k["spill"] or k["stack"]]
    assert not bad, "\n".join(bad)


def test_registers_within_budget(kernels):
    bad = [f"{_describe(k)}: {k['regs']} registers > {register_budget(k['kernel'], k['args'])}"
           for k in kernels.values() if k["regs"] > register_budget(k["kernel"], k["args"])]
    assert not bad, "\n".join(bad)


def test_shared_memory_within_hopper_limits(kernels):
    for k in kernels.values():
        assert k["smem"] <= SMEM_PER_BLOCK, _describe(k)
        assert k["smem"] * blocks_per_sm(k["kernel"], k["args"]) <= SMEM_PER_SM, _describe(k)


def test_hot_kernels_use_ex2_and_16_byte_loads(kernels):
    hot = [k for k in kernels.values()
           if k["kernel"] in STREAMING + ("ncl_grad_kernel",) and k["args"][1] == "float"]
    assert hot
    for k in hot:
        assert "ex2.approx.ftz.f32" in k["ptx"] or k["kernel"] == "apply_biases_kernel", \
            _describe(k)
        vec = k["args"][2] if k["kernel"] in ("col_lse_kernel", "ncl_grad_kernel") else \
            k["args"][3]
        if vec:
            assert "ld.global.cs.v4" in k["ptx"], _describe(k)
    for k in kernels.values():  # float64 keeps the correctly rounded exp
        if k["args"][0] == "double":
            assert "ex2.approx" not in k["ptx"], _describe(k)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
