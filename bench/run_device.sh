#!/usr/bin/env bash
# The one script a GPU session runs, in one call, from the repository root:
#
#     bash bench/run_device.sh [OUTDIR]     # OUTDIR defaults to $OUT, else /tmp/ncl-device-out
#
# 1. builds ncl_kernels with CUDA for sm_90 (H100/H200) into the machine's python3,
# 2. runs the GPU tests (tests marked gpu or triton),
# 3. runs the GPU benchmarks at sizes that fill an H200 (NCL_BENCH_SIZE=gpu: 32768^2 dense,
#    65536^2 x 512 streaming), cheap cases first and torch.compile peers last,
# 4. writes OUTDIR/log.txt (everything, the test output too), OUTDIR/bench-*.json
#    (pytest-benchmark, one per suite), OUTDIR/results.json (bench/collect.py records) and
#    OUTDIR/results.md (tables): 8 files, the most a device call brings back.
#
# Overrides (for a dry run of the script's mechanics on a CPU machine): PYTHON,
# NCL_BENCH_SIZE, NCL_BENCH_DEVICE, BUDGET_S, SKIP_BUILD=1.
#
# Budget: the whole script stops starting steps after BUDGET_S (default 450 s, under the
# 8-minute mark) and each step has its own timeout, so a hung or slow step costs only its
# slot. It never stops at a failing step, and collects whatever benchmark JSON exists at
# the end. Exit status: 0 when the build, the tests and every benchmark step passed.
#
# The device machine has no network: nothing is pip-installed from a registry. Optional
# GPU peers (flash-sinkhorn, inf-cl, POT) run only if importable there, e.g. carried as
# wheels into $PYTHONPATH (see /work/.library/device/README.md); otherwise they skip with
# the reason in the log.
set -u
set -o pipefail

START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
OUTDIR=${1:-${OUT:-/tmp/ncl-device-out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/log.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export NCL_BENCH_SIZE=${NCL_BENCH_SIZE:-gpu}
export NCL_BENCH_DEVICE=${NCL_BENCH_DEVICE:-cuda}
cd "$(dirname "$0")/.."
: > "$LOG"
FAILED=()

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD with a timeout of min(SECONDS, time left in the budget)
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
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
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

step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or triton" tests -rs

# Benchmarks: one pytest per suite (a timeout loses only that suite's JSON); the
# torch.compile peers, whose compilation takes tens of seconds each, go last.
for suite in primitives sinkhorn loss retrieval; do
    step "bench-$suite" 90 "$PY" -m pytest -q -p no:cacheprovider "bench/test_bench_$suite.py" \
        --benchmark-only -k "not compile" --benchmark-json "$OUTDIR/bench-$suite.json" \
        --benchmark-columns=median,rounds -rs
done
step bench-compile 90 "$PY" -m pytest -q -p no:cacheprovider bench/ --benchmark-only \
    -k "compile" --benchmark-json "$OUTDIR/bench-compile.json" --benchmark-columns=median -rs

# Always: whatever JSON exists becomes results.json and results.md
jsons=$(ls "$OUTDIR"/bench-*.json 2>/dev/null)
if [ -n "$jsons" ]; then
    # shellcheck disable=SC2086
    "$PY" bench/collect.py $jsons --out "$OUTDIR/results.json" --markdown \
        > "$OUTDIR/results.md" 2>> "$LOG" || FAILED+=("collect")
    tail -n 60 "$OUTDIR/results.md"
else
    log "no benchmark JSON was written"
    FAILED+=("collect")
fi

log "done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
