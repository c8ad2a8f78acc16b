"""The benchmark harness: sizes, device, roofs, peak memory, and one `run_case` for all.

Every case goes through :func:`run_case`, which (1) runs the implementation once while
measuring its peak memory, (2) checks that result (the caller's ``check``) before any
timing, (3) times it with pytest-benchmark, synchronizing the device inside the timed
function, and (4) stores in ``benchmark.extra_info`` what ``bench/collect.py`` turns into
the records of ``bench/results/*.json``: op, backend, shape, dtype, the bytes or flops the
op must move or do, achieved rate, the roof measured in this session, roof ratio, peak
memory (and how it was measured).

Environment:
    NCL_BENCH_SIZE    tiny | small | large | gpu   (default: small on CPU, gpu on CUDA)
    NCL_BENCH_DEVICE  cpu | cuda                   (default: cuda when available)
    NCL_BENCH_TIME    target seconds of timed rounds per case (default 1.0 CPU, 0.5 GPU)
    NCL_BENCH_ORACLE_MAX  score elements above which checks use float32 formulas or peers
                      instead of the float64 oracle (default 2**28)
    NCL_BENCH_RECORDS a file to which each timed case appends its record as one JSON line
                      the moment it is measured (bench/run_device.sh: a suite killed by its
                      timeout keeps the cases it finished)
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch

import ncl_kernels as nk
from ncl_kernels.backends import NAMES as BACKEND_NAMES

from collect import make_record


def _device() -> torch.device:
    want = os.environ.get("NCL_BENCH_DEVICE")
    if want is None:
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


DEVICE = _device()
ON_GPU = DEVICE.type == "cuda"


@dataclass(frozen=True)
class Sizes:
    dense: int          # N = M of the dense cases
    stream: int         # N = M of the streaming (embedding) cases
    dim: int            # D of the streaming cases
    loss_stream: int    # N = M of the streaming loss (its eager peers materialize N x M)
    bank: int           # K of gallery_bias
    gallery: int        # M of gallery_bias and ranks
    queries: int        # queries of ranks


# tiny: a correctness smoke run (pytest bench/ without --benchmark-only); small: the
# default CPU run (< 10 minutes on 2 cores); large: a longer CPU run; gpu: fills an H200.
SIZES = {
    "tiny": Sizes(dense=256, stream=256, dim=32, loss_stream=256, bank=256, gallery=192,
                  queries=128),
    "small": Sizes(dense=2048, stream=2048, dim=128, loss_stream=1024, bank=2048,
                   gallery=1024, queries=1024),
    "large": Sizes(dense=4096, stream=8192, dim=256, loss_stream=4096, bank=8192,
                   gallery=4096, queries=4096),
    "gpu": Sizes(dense=32768, stream=65536, dim=512, loss_stream=32768, bank=65536,
                 gallery=16384, queries=16384),
}

SIZE_NAME = os.environ.get("NCL_BENCH_SIZE", "gpu" if ON_GPU else "small")
if SIZE_NAME not in SIZES:
    raise ValueError(f"NCL_BENCH_SIZE must be one of {sorted(SIZES)}; got {SIZE_NAME!r}")
SIZE = SIZES[SIZE_NAME]
TARGET_S = float(os.environ.get("NCL_BENCH_TIME", "0.5" if ON_GPU else "1.0"))

#: storage dtypes timed. CPU: float32 (bfloat16 doubles the run time for little news).
#: GPU: float32 and bfloat16 for the dense (memory-bound) cases; the streaming cases are
#: matmul work at sizes where one call takes seconds, so they run in bfloat16, the
#: training dtype, only.
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
STREAM_DTYPES = [torch.bfloat16] if ON_GPU else [torch.float32]

#: above this many score elements the float64 oracle (which materializes several N x M
#: float64 temporaries, more with autograd) would take tens of GB; the cases check
#: against a float32 PyTorch formula or peer instead (the GPU sizes).
#: NCL_BENCH_ORACLE_MAX=0 forces those checks on small sizes (to test them on a CPU).
ORACLE_MAX_ELEMS = int(os.environ.get("NCL_BENCH_ORACLE_MAX", str(1 << 28)))

SCALE = 10.0   # cosine scores at temperature 0.1


def ours_backends(auto: bool = False):
    """Every usable backend that runs on DEVICE, so new backends are picked up as merged.

    ``auto=True`` (the end-to-end suites) adds ``"auto"`` on a GPU with our kernels: its
    per-primitive mix of cuda and triton is what users get by default, measured as a whole.
    The primitive suite leaves it out: per primitive it is one of its parts.
    """
    report = nk.backends()
    names = []
    for name in BACKEND_NAMES:
        info = report[name]
        if info["usable"] and info["devices"] in ("any", DEVICE.type):
            names.append(name)
    if auto and ON_GPU and any(n in names for n in ("cuda", "triton")):
        names.append("auto")
    return names


#: an ``impl`` suffix that forces streaming in the embedding-form suites; the plain name
#: runs the cost model's choice (``materialize=None``)
STREAM = ":stream"


def with_streaming(impls):
    """``impls`` plus, for each of our backends, its forced-streaming variant."""
    ours = [i for i in impls if i in BACKEND_NAMES or i == "auto"]
    return list(impls) + [i + STREAM for i in ours]


def split_impl(impl: str):
    """``(backend, materialize)`` for an embedding-form ``impl``."""
    if impl.endswith(STREAM):
        return impl[:-len(STREAM)], False
    return impl, None


def sync():
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    return cpu_name()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"model name\s*:\s*(.+)", fh.read())
        if m:
            return f"{m.group(1).strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# -- roofs --------------------------------------------------------------------------------

def _best_time(fn, repeat=5):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_roofs() -> dict:
    """Ceilings measured now, on this device: bandwidths (bytes/s), matmul and exp rates.

    read: one reduction over a buffer well beyond the caches; copy: ``dst.copy_(src)``
    counting bytes read plus written; matmul_<dtype>: a square product's flop/s on random
    data (never zeros, which run faster); exp: elements/s of an exp-sum sweep.

    On the CPU the read and exp roofs come from the C++ module's own kernels
    (:func:`native_cpu_roofs`: its vector loads, its exp, every thread), the honest ceilings
    of the CPU passes: ``torch.sum`` reads slower and ``torch.exp`` computes slower than
    they do. The torch-measured values stay beside them (``*_torch``).
    """
    roofs = _bandwidth_roofs((4 << 30) if ON_GPU else (256 << 20))
    if not ON_GPU:
        native = native_cpu_roofs()
        if native:
            roofs["read_torch_Bps"], roofs["exp_torch_per_s"] = (roofs["read_Bps"],
                                                                  roofs["exp_per_s"])
            roofs.update(native)
    n = 8192 if ON_GPU else 1536
    for dtype in DTYPES + ([torch.float64] if not ON_GPU else []):
        roofs[f"matmul_{_dtype_name(dtype)}_flops"] = _matmul_rate(n, dtype)
    return roofs


def native_cpu_roofs(n_bytes: int = 256 << 20, repeat: int = 5) -> dict:
    """``{"read_Bps", "exp_per_s"}`` measured by ``_C_cpu``'s roof kernels on all threads
    (``{}`` without the module).

    read: ``_C_cpu.read_sum`` over ``n_bytes`` (far beyond the caches) with the kernels'
    vector loads. exp: ``_C_cpu.exp_sum``, the LSE passes' exp-sum sweep alone (exp of
    x - shift, then add) over 2048 floats kept in L1, on every thread: the compute floor
    of a pass that needs one exponential per element.
    """
    try:
        from ncl_kernels import _C_cpu
    except ImportError:
        return {}
    threads = torch.get_num_threads()
    src = torch.rand(n_bytes // 4)
    x = torch.rand(2048) * 20 - 20
    reps = 2000
    read = _best_time(lambda: _C_cpu.read_sum(src.data_ptr(), src.numel(), threads), repeat)
    exp = _best_time(lambda: _C_cpu.exp_sum(x.data_ptr(), x.numel(), 0.0, reps, threads), repeat)
    return {"read_Bps": n_bytes / read, "exp_per_s": x.numel() * reps * threads / exp}


def _bandwidth_roofs(n_bytes: int) -> dict:
    src = torch.rand(n_bytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    n_exp = src.numel() // 4
    return {"read_Bps": n_bytes / _best_time(src.sum),
            "copy_Bps": 2 * n_bytes / _best_time(lambda: dst.copy_(src)),
            # out of place: repeated in-place exp would run into inf, a special case
            "exp_per_s": n_exp / _best_time(lambda: torch.exp(src[:n_exp], out=dst[:n_exp]))}


def _matmul_rate(n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    return 2 * n ** 3 / _best_time(lambda: a @ b, 3)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- peak memory --------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_rss_peak() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the RSS high-water mark) to the
    # current RSS, so VmHWM after a call minus VmRSS before it is the call's peak growth.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _FreshPages:
    """While active, glibc serves every allocation above 64 KiB with a fresh ``mmap``.

    Without this, a buffer freed by an earlier case stays resident in the heap and a new
    allocation reuses it without raising the RSS, so the RSS peak of a call would miss
    most of its temporaries. On exit the threshold goes to glibc's largest dynamic value
    (32 MiB), close to the steady state the timed rounds would reach anyway.
    """

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        try:
            libc = ctypes.CDLL(None)
            self.mallopt, self.malloc_trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):  # not glibc: measure as is
            self.mallopt = None

    def __enter__(self):
        if self.mallopt is not None:
            self.mallopt(self.M_MMAP_THRESHOLD, 64 << 10)
            # return the free heap now: a trim in the middle of the call would lower the
            # RSS under the call's own growth and hide part of its peak
            self.malloc_trim(0)
        return self

    def __exit__(self, *exc):
        if self.mallopt is not None:
            self.mallopt(self.M_MMAP_THRESHOLD, 32 << 20)


def peak_memory(fn: Callable[[], object]):
    """Run ``fn`` once; return ``(result, peak_bytes, method)``.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
    CPU: torch's CPU allocator keeps no peak statistic and tracemalloc does not see it, so
    this measures the process RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs) above the RSS before the call, with allocations above 64 KiB
    forced onto fresh pages (:class:`_FreshPages`), so the number is the peak of the
    call's live large buffers (plus any caches it fills; small allocations that reuse
    freed heap are not seen). Without clear_refs: a ``getrusage`` ru_maxrss delta, which
    is 0 unless the call raises the process's all-time peak.
    """
    if ON_GPU:
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        out = fn()
        sync()
        return out, torch.cuda.max_memory_allocated(DEVICE) - base, "cuda_max_allocated"
    if _reset_rss_peak():
        with _FreshPages():
            base = _status_kib("VmRSS")
            out = fn()
            peak = _status_kib("VmHWM")
        if base is not None and peak is not None:
            return out, max(0, peak - base) * 1024, "rss_hwm_delta_fresh_pages"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out, (peak - base) * 1024, "ru_maxrss_delta"


# -- the one case runner ------------------------------------------------------------------

def run_case(benchmark, roofs: dict, *, op: str, backend: str, fn: Callable[[], object],
             check: Callable[[object], str], shape, dtype: torch.dtype,
             bytes_moved: float = 0.0, flops: float = 0.0, roof: str = "read",
             setup: Callable[[], None] | None = None, ours: bool = True, note: str = "",
             exps: float = 0.0):
    """Check, then time ``fn`` and record its throughput against a measured roof.

    Args:
        fn: the operation; takes no arguments (``setup`` may rebind what it reads, e.g. a
            fresh clone for an in-place op; setup is not timed).
        check: gets fn's result, asserts it is right, returns a short text of what it
            checked and the error it found (stored in extra_info).
        bytes_moved / flops: what the op must move / compute at the least (the same
            formula for ours and every peer of the op, so their roof ratios compare).
        roof: ``"read"`` or ``"copy"`` (bandwidth roof, unit GB/s) or ``"matmul"`` (the
            dtype's measured matmul rate, unit TFLOP/s).
        exps: the exponentials the op's math needs (one per element and LSE pass; the
            same for ours and every peer). With the measured exp rate (``exp_per_s``)
            this is a second floor: the record gets ``exp_floor_ms`` and
            ``exp_floor_ratio`` (floor / time: 1 means at the exp floor) beside the
            bandwidth ``roof_ratio``.
    """
    if setup is not None:
        setup = _synced_setup(setup)
        setup()
    start = time.perf_counter()
    result, peak, peak_method = peak_memory(lambda: _synced(fn))
    once = time.perf_counter() - start  # sizes the rounds below
    checked = check(result)
    del result

    def timed():
        fn()
        sync()

    if ON_GPU:
        # the first call may have included Triton/CUDA JIT and autotuning: size the
        # rounds from a warm call instead
        if setup is not None:
            setup()
        start = time.perf_counter()
        timed()
        once = time.perf_counter() - start
    # about TARGET_S of rounds, 3 to 50 of them; a case whose single call already takes
    # longer (a slow peer such as KeOps on the CPU, or the largest GPU cases) gets 2 or 1
    # rounds, so that it cannot eat the run's budget (the check call ran it once more)
    if once <= TARGET_S:
        rounds = int(max(3, min(50, TARGET_S / max(once, 1e-6))))
    else:
        rounds = 2 if once <= 3 * TARGET_S else 1
    kwargs = {"rounds": rounds, "iterations": 1, "warmup_rounds": 0}
    if setup is not None:
        kwargs["setup"] = setup
    benchmark.pedantic(timed, **kwargs)

    if roof == "matmul":
        unit, work = "TFLOP/s", flops
        roof_value = roofs[f"matmul_{_dtype_name(_compute_dtype(dtype))}_flops"]
        scale = 1e12
    else:
        unit, work = "GB/s", bytes_moved
        roof_value = roofs[f"{roof}_Bps"]
        scale = 1e9
    info = {"op": op, "backend": backend, "ours": ours, "shape": list(shape),
            "dtype": _dtype_name(dtype), "device": DEVICE.type,
            "gpu": device_name() if ON_GPU else None, "machine": device_name(),
            "size": SIZE_NAME, "bytes": bytes_moved, "flops": flops, "unit": unit,
            "work": work, "roof": roof_value / scale, "roof_kind": roof,
            "peak_mem_bytes": peak, "peak_mem_method": peak_method, "check": checked,
            "note": note, "threads": torch.get_num_threads(), "roofs": dict(roofs)}
    if exps and roofs.get("exp_per_s"):
        info.update(exps=exps, exp_floor_ms=exps / roofs["exp_per_s"] * 1e3)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarks are disabled (a correctness-only run)
        seconds = stats.stats.median
        achieved = work / seconds / scale
        info.update(time_ms=seconds * 1e3, achieved=achieved,
                    roof_ratio=achieved / (roof_value / scale))
        if "exp_floor_ms" in info:
            info["exp_floor_ratio"] = info["exp_floor_ms"] / info["time_ms"]
        _append_record(info, stats.stats, benchmark)
    benchmark.extra_info.update(info)


def _append_record(info: dict, stats, benchmark) -> None:
    path = os.environ.get("NCL_BENCH_RECORDS")
    if not path:
        return
    rec = make_record(info, stats.median, stats.min, stats.rounds,
                      time.strftime("%Y-%m-%d"), getattr(benchmark, "fullname", None))
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    floor = (f", {100 * rec['exp_floor_ratio']:.1f}% of the exp floor"
             if rec.get("exp_floor_ratio") else "")
    print(f"\n[record] {rec['op']} {rec['backend']} {rec['shape']} {rec['dtype']}: "
          f"{rec['time_ms']:.3f} ms, {rec['achieved']:.3g} {rec['unit']} "
          f"({100 * rec['roof_ratio']:.1f}% of roof{floor})", flush=True)


def _synced(fn):
    out = fn()
    sync()
    return out


def _synced_setup(setup):
    """``setup`` followed by a device sync, returning None (pytest-benchmark would take a
    returned value as the arguments of the timed call). Without the sync, a setup's device
    work, e.g. the clone that restores S for an in-place case, was still running when the
    timer started: the first GPU run's in-place and apply_biases_ times include up to one
    copy of S."""
    def synced():
        setup()
        sync()
    return synced


def _compute_dtype(dtype):
    """The matmul roof that applies: the cases multiply in float32 for low-precision
    storage on the CPU (the streaming path upcasts), in the storage dtype on the GPU."""
    if not ON_GPU and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


# -- checks -------------------------------------------------------------------------------

def unit_rows(n: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` seeded random unit vectors of size ``d`` (cosine-score embeddings), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)


def cosine_scores(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A seeded n x n cosine score matrix on DEVICE, in ``dtype``.

    The product runs on the device: at GPU sizes the CPU would take seconds.
    """
    x = unit_rows(n, 64, 0, torch.float32).to(DEVICE)
    y = unit_rows(n, 64, 1, torch.float32).to(DEVICE)
    return (x @ y.T).to(dtype)


def rel_err(a, b) -> float:
    """Norm-wise relative error of ``a`` against ``b``, in float64 on b's device."""
    b = torch.as_tensor(b).detach().double()
    a = torch.as_tensor(a).detach().to(b.device).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite values in the result"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def tolerance(dtype: torch.dtype, against_oracle: bool) -> float:
    """Bound on the norm-wise relative error a case must meet before it is timed.

    float32 against the float64 oracle: SPEC's 1e-5 with room for the summation order of
    large sizes (1e-4). Low-precision storage: outputs stored in that dtype carry its
    rounding (bfloat16: 2^-8), so 1e-2. Against a float32 peer (sizes beyond the
    oracle): 1e-3. These are sanity bounds before timing; tests/ enforces SPEC's.
    """
    if dtype == torch.float64:
        return 1e-9
    if dtype in (torch.bfloat16, torch.float16):
        return 1e-2
    return 1e-4 if against_oracle else 1e-3


def expect_close(what: str, ours, ref, dtype, against_oracle=True) -> str:
    err = rel_err(ours, ref)
    bound = tolerance(dtype, against_oracle)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g}"
    return f"{what} rel err {err:.2e} vs {'float64 oracle' if against_oracle else 'peer'}"
