#!/usr/bin/env bash
# The one script a GPU session runs, in one call, from the repository root:
#
#     bash bench/run_device.sh [OUTDIR]     # OUTDIR defaults to $OUT, else /tmp/ncl-device-out
#
# 1. installs carried wheels (optional peers: flash-sinkhorn, inf-cl, POT) from .whl/,
# 2. builds ncl_kernels with CUDA for sm_90 (H100/H200) into the machine's python3,
# 3. runs the GPU tests (tests marked gpu or triton; pytest-xdist when the image has it),
# 4. runs the GPU benchmarks at sizes that fill an H200 (NCL_BENCH_SIZE=gpu: 32768^2 dense,
#    65536^2 x 512 streaming), cheap cases first and torch.compile peers last, then
#    compute-sanitizer (bench/sanitize_cuda.sh) and the Triton entry points' own bench,
# 5. writes under OUTDIR (at most 8 files, the most a device call brings back):
#    log.txt (everything), gpu-tests.xml (junit, per-test times), records.jsonl (each
#    benchmark record appended the moment it is measured, so a suite killed by its timeout
#    keeps what it finished), triton-bench.jsonl, results.json (bench/collect.py records)
#    and results.md (tables).
#
# Optional peers: the device machine has no network. Download the wheels here first
# (see bench/RESULTS.md, "GPU runs"), into .whl/ (git-ignored through .git/info/exclude),
# and name .whl in the device call's carry.
#
# Overrides (for a dry run of the script's mechanics on a CPU machine): PYTHON,
# NCL_BENCH_SIZE, NCL_BENCH_DEVICE, NCL_BENCH_TIME, BUDGET_S, SKIP_BUILD=1, XDIST (workers
# for the GPU tests, 0 = off).
#
# Budget: the whole script stops starting steps after BUDGET_S (default 540 s, inside a
# 600 s device call) and each step has its own timeout, so a hung or slow step costs only
# its slot. It never stops at a failing step, and collects whatever benchmark records exist
# at the end. Exit status: 0 when the build, the tests and every benchmark step passed.
set -u
set -o pipefail

START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
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
XDIST=${XDIST:-12}
cd "$(dirname "$0")/.."
: > "$LOG"
: > "$NCL_BENCH_RECORDS"
FAILED=()

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD with a timeout of min(SECONDS, time left in the budget);
# SIGINT first, so that a pytest cut short still prints its summary and writes its junit XML
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 20 )); then
        log "SKIP $name: budget spent (${left}s left)"
        FAILED+=("$name(skipped)")
        return 1
    fi
    (( limit > left )) && limit=$left
    log "BEGIN $name (timeout ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    if (( rc == 0 )); then
        log "END $name: ok"
    else
        (( rc == 124 || rc == 137 )) && log "END $name: TIMED OUT" || log "END $name: rc=$rc"
        FAILED+=("$name")
    fi
    return $rc
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

xdist=()
if (( XDIST > 0 )) && "$PY" -c "import xdist" 2> /dev/null; then
    xdist=(-n "$XDIST")  # Triton compiles on the host: spread it over the cores
fi
step gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or triton" tests \
    "${xdist[@]}" -rfEs --tb=short --durations=15 --junitxml="$OUTDIR/gpu-tests.xml"

# Benchmarks: one pytest per suite (a timeout loses only the rest of that suite: every
# finished case is already in records.jsonl); the torch.compile peers, whose compilation
# takes tens of seconds each, go last.
for suite in primitives sinkhorn loss; do
    step "bench-$suite" 90 "$PY" -m pytest -q -p no:cacheprovider "bench/test_bench_$suite.py" \
        --benchmark-only -k "not compile" --benchmark-columns=median,rounds -rs
done
step sanitize 45 env PYTHON="$PY" bash bench/sanitize_cuda.sh
step bench-retrieval 60 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_retrieval.py \
    --benchmark-only -k "not compile" --benchmark-columns=median,rounds -rs
step triton-bench 45 bash -c "'$PY' -m ncl_kernels.backends.triton.bench \
    | tee '$OUTDIR/triton-bench.jsonl'"
step bench-compile 90 "$PY" -m pytest -q -p no:cacheprovider bench/ --benchmark-only \
    -k "compile" --benchmark-columns=median -rs

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
