#!/usr/bin/env bash
# The one script a GPU session runs, in one call, from the repository root:
#
#     bash bench/run_device.sh [OUTDIR]     # OUTDIR defaults to $OUT, else /tmp/ncl-device-out
#
# Run G2 (issue 19) within the 15-minute device budget (the machine's start counts too,
# so the script itself ends within BUDGET_S = 8 minutes), in the order of what the next
# decisions need:
#
# 1. installs carried wheels (optional peers: flash-sinkhorn, inf-cl, POT) from .whl/,
# 2. builds ncl_kernels with CUDA for sm_90 (H100/H200) into the machine's python3,
# 3. the GPU tests G1 did not reach (determinism, stream, no-sync, 64-bit indexing, end
#    to end, the Triton GPU tests: fused step, exact one-pair gradient, repeatability),
#    marked gpu or triton, without the big per-primitive matrix,
# 4. bench/triton_entry.py: the Triton kernels against their roofs (streaming LSE passes,
#    the fused Sinkhorn step against two passes, the tensor-core gradient with the split
#    and the rounded-once G, the streaming loss at 32768^2 and 65536^2 x 512),
# 5. the benchmark suites at sizes that fill an H200 (NCL_BENCH_SIZE=gpu): streaming
#    Sinkhorn against flash-sinkhorn and the loss against inf-cl on the same shapes, with
#    "auto" measured as a whole beside each backend; then the primitives and retrieval,
# 6. with what is left of the budget: bench/triton_sweep.py (alternatives to the shipped
#    launch table), compute-sanitizer memcheck, the torch.compile peers, the per-primitive
#    test matrix (marked matrix), racecheck, the sm_90a compile table under this Triton,
# 7. writes under OUTDIR (at most 8 files, the most a device call brings back): log.txt
#    (everything), gpu-tests.xml and gpu-matrix.xml (junit, per-test times), records.jsonl
#    (each benchmark record appended the moment it is measured, so a suite killed by its
#    timeout keeps what it finished), results.json (bench/collect.py records), results.md
#    (tables), triton-entry.jsonl and triton-sweep.jsonl (one JSON line per measurement).
#
# Optional peers: the device machine has no network. Download the wheels here first
# (bench/RESULTS.md, "GPU"), into .whl/ (git-ignored through .git/info/exclude), and name
# .whl in the device call's carry.
#
# Environment: BUDGET_S (default 480: the script stops starting steps after it), ONLY="step
# names" (run just those, e.g. ONLY="build backends gpu-matrix"), SKIP="step names" (run
# all but those), XDIST (pytest-xdist workers for the tests, default 6, 0 = off); for a dry
# run of the mechanics on a CPU machine: PYTHON, NCL_BENCH_SIZE, NCL_BENCH_DEVICE,
# NCL_BENCH_TIME, SKIP_BUILD=1, DRY=1 (the Triton scripts in --dry mode: CPU tensors in
# Triton's interpreter, untimed).
#
# Each step has its own timeout, so a hung or slow step costs only its slot. The script
# never stops at a failing step and collects whatever benchmark records exist at the end.
# Exit status: 0 when every step that ran passed.
set -u
set -o pipefail

START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
OUTDIR=${1:-${OUT:-/tmp/ncl-device-out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/log.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export NCL_BENCH_SIZE=${NCL_BENCH_SIZE:-gpu}
export NCL_BENCH_DEVICE=${NCL_BENCH_DEVICE:-cuda}
export NCL_BENCH_TIME=${NCL_BENCH_TIME:-0.3}
export NCL_BENCH_RECORDS="$OUTDIR/records.jsonl"
XDIST=${XDIST:-6}
cd "$(dirname "$0")/.."
: > "$LOG"
: > "$NCL_BENCH_RECORDS"
FAILED=()

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD with a timeout of min(SECONDS, time left in the budget);
# SIGINT first, so that a pytest cut short still prints its summary and writes its junit XML.
# Each step is a job of its own process group (set -m), killed whole when it ends: on the
# first device run, pytest-xdist workers outlived an interrupted test step and held about
# 100 GiB of GPU memory, so the next benchmark suite ran out of memory.
set -m
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0  # not asked for in this run
    fi
    if [ -n "${SKIP:-}" ] && [[ " $SKIP " == *" $name "* ]]; then
        log "SKIP $name (SKIP)"
        return 0
    fi
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 20 )); then
        log "SKIP $name: budget spent (${left}s left)"
        FAILED+=("$name(skipped)")
        return 1
    fi
    (( limit > left )) && limit=$left
    log "BEGIN $name (timeout ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1 &
    local pid=$!
    wait "$pid"
    local rc=$?
    kill -KILL -- "-$pid" 2> /dev/null && log "killed what $name left running"
    if (( rc == 0 )); then
        log "END $name: ok$(gpu_memory)"
    else
        (( rc == 124 || rc == 137 )) && log "END $name: TIMED OUT$(gpu_memory)" \
            || log "END $name: rc=$rc$(gpu_memory)"
        FAILED+=("$name")
    fi
    return $rc
}

gpu_memory() {
    command -v nvidia-smi > /dev/null || return 0
    echo "; GPU memory used $(nvidia-smi --query-gpu=memory.used --format=csv,noheader \
        2> /dev/null | head -1)"
}

log "ncl_kernels device run -> $OUTDIR (budget ${BUDGET_S}s, sizes $NCL_BENCH_SIZE)"
if ls .whl/*.whl > /dev/null 2>&1; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/ncl-site .whl/*.whl
    export PYTHONPATH=/tmp/ncl-site${PYTHONPATH:+:$PYTHONPATH}
fi
step info 30 bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name()); \
import importlib.util as u; print({m: bool(u.find_spec(m)) for m in \
(\"triton\", \"ot\", \"pykeops\", \"flash_sinkhorn\", \"inf_cl\", \"pytest_benchmark\")})'; \
nvcc --version | tail -2"

# --no-build-isolation: no registry here; scikit-build-core, pybind11, cmake and ninja
# are in the image. CUDAARCHS and the explicit define both say sm_90.
export CUDAARCHS=90
[ "${SKIP_BUILD:-0}" = 1 ] && log "SKIP build (SKIP_BUILD=1)" || \
step build 240 env NCL_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -q \
    --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -e .
step backends 30 "$PY" -c "import ncl_kernels as nk; import json; \
print(json.dumps(nk.backends(), indent=1)); assert nk.backends()['cuda']['usable']"

# Tests: the properties and end-to-end checks first, then (budget permitting) the large
# per-primitive matrix. pytest-xdist when the image has it: Triton compiles on the host. Few
# workers with few threads each: on the first run 12 workers x 16 BLAS threads on 16 cores
# (and 12 CUDA contexts time-slicing one GPU) made single small cases take 10-20 s.
xdist=()
if (( XDIST > 0 )) && "$PY" -c "import xdist" 2> /dev/null; then
    xdist=(-n "$XDIST")
fi
tests() {  # tests NAME SECONDS MARKEXPR
    step "$1" "$2" env OMP_NUM_THREADS=2 "$PY" -m pytest -q -p no:cacheprovider -m "$3" tests \
        "${xdist[@]}" -rfEs --tb=short --durations=10 --junitxml="$OUTDIR/$1.xml"
}
tests gpu-tests 120 "(gpu or triton) and not matrix"

# The Triton kernels' own measurements (bench/triton_entry.py) next: the figures issue 19
# is judged by. DRY=1: the same logic on CPU tensors in Triton's interpreter, untimed.
triton_mode=()
[ "${DRY:-0}" = 1 ] && triton_mode=(--dry) && export TRITON_INTERPRET=1
step triton-entry 150 "$PY" bench/triton_entry.py "${triton_mode[@]}" \
    --out "$OUTDIR/triton-entry.jsonl"

# Benchmarks: one pytest per suite (a timeout loses only the rest of that suite: every
# finished case is already in records.jsonl); the torch.compile peers, whose compilation
# takes tens of seconds each, go late. Durations on the first H200 run: primitives 47 s,
# sinkhorn 28 s (without its streaming cases), loss 46 s, retrieval 27 s, compile 83 s.
bench() {  # bench NAME SECONDS PYTEST-ARGS...
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider --benchmark-only \
        --benchmark-columns=median,rounds -rs "$@"
}
# streaming Sinkhorn (ours, auto, flash-sinkhorn on the same problem) and the loss (ours,
# auto, inf-cl's CLIP loss on the same shapes) first: G1 did not reach flash-sinkhorn
bench bench-sinkhorn 100 bench/test_bench_sinkhorn.py -k "not compile"
bench bench-loss 80 bench/test_bench_loss.py -k "not compile"
bench bench-primitives 70 bench/test_bench_primitives.py -k "not compile"
bench bench-retrieval 45 bench/test_bench_retrieval.py -k "not compile"
step triton-sweep 90 "$PY" bench/triton_sweep.py "${triton_mode[@]}" \
    --out "$OUTDIR/triton-sweep.jsonl"
step memcheck 45 env PYTHON="$PY" TOOLS=memcheck bash bench/sanitize_cuda.sh
bench bench-compile 100 bench/ -k "compile"
tests gpu-matrix 300 "matrix"
step racecheck 120 env PYTHON="$PY" TOOLS=racecheck bash bench/sanitize_cuda.sh
# registers, spills and shared memory of every Triton kernel under this machine's Triton
[ "${DRY:-0}" = 1 ] || step sm90-table 90 "$PY" tests/test_triton_sm90.py

# Always: whatever records exist become results.json and results.md
if [ -s "$NCL_BENCH_RECORDS" ]; then
    "$PY" bench/collect.py "$NCL_BENCH_RECORDS" --out "$OUTDIR/results.json" --markdown \
        > "$OUTDIR/results.md" 2>> "$LOG" || FAILED+=("collect")
    tail -n 60 "$OUTDIR/results.md"
else
    log "no benchmark record was written"
    FAILED+=("collect")
fi

log "done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
