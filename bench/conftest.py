"""pytest-benchmark setup for bench/: the oracle on the path, roofs, and the run modes.

    pytest bench/ --benchmark-only                 # the timed run (default sizes)
    pytest bench/ --benchmark-only --benchmark-json run.json && python bench/collect.py run.json
    pytest bench/                                  # a fast correctness smoke run: tiny
                                                   # sizes, each case run once, no timing

Sizes, device and time per case: see ``bench/harness.py`` (NCL_BENCH_SIZE, ...).
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # python_ref (the float64 oracle) is not installed; append so the installed
    # ncl_kernels is still the one imported
    sys.path.append(str(ROOT))

# Without --benchmark-only (or any timing flag) this is a smoke run: choose the tiny sizes
# before harness.py is imported by the test modules. pytest_configure runs too late for
# that (test modules are imported at collection, after it, but harness reads the size at
# import), so decide from the command line here.
_TIMING_FLAGS = ("--benchmark-only", "--benchmark-enable", "--benchmark-json",
                 "--benchmark-autosave", "--benchmark-save")
if not any(a.startswith(_TIMING_FLAGS) for a in sys.argv):
    os.environ.setdefault("NCL_BENCH_SIZE", "tiny")
    _SMOKE = True
else:
    _SMOKE = False

import harness  # noqa: E402  (reads NCL_BENCH_SIZE at import: after the line above)


def pytest_configure(config):
    # POT's torch backend still uses torch.jit.script_method: noise, not ours
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    if _SMOKE and not config.getoption("benchmark_disable", False):
        # run every case once as a correctness check; pytest-benchmark then times nothing
        config.option.benchmark_disable = True


def pytest_report_header(config):
    line = (f"ncl bench: device={harness.DEVICE} ({harness.device_name()}), "
            f"size={harness.SIZE_NAME} {harness.SIZE}, ours={harness.ours_backends()}, "
            f"smoke={'yes' if _SMOKE else 'no'}")
    return [line]


@pytest.fixture(scope="session")
def roofs():
    """Roofs measured once per session on the benchmark device (see harness.measure_roofs)."""
    if _SMOKE:
        # a smoke run records no rates; skip the seconds the measurement takes
        return {"read_Bps": 1.0, "copy_Bps": 1.0, "exp_per_s": 1.0,
                "matmul_float32_flops": 1.0, "matmul_bfloat16_flops": 1.0,
                "matmul_float64_flops": 1.0}
    return harness.measure_roofs()
