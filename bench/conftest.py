"""Benchmark fixtures: the oracle on the path, sizes, and roofs measured in this session.

Sizes: NCL_BENCH_SIZE=small (default, minutes on a 2-core CPU) or large.
"""

import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

SIZE = os.environ.get("NCL_BENCH_SIZE", "small")
DENSE_N = {"small": 2048, "large": 4096}[SIZE]


def _best_of(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="session")
def read_bandwidth():
    """Bytes per second of one read of a 256 MiB float32 buffer (a reduction), measured."""
    buf = torch.ones(64 << 20)
    buf.sum()
    return buf.numel() * 4 / _best_of(buf.sum)


def record(benchmark, *, bytes_moved, roof, **extra):
    """Store bytes, achieved GB/s, the roof and their ratio in ``benchmark.extra_info``."""
    seconds = benchmark.stats.stats.min
    achieved = bytes_moved / seconds
    benchmark.extra_info.update(bytes=bytes_moved, achieved_GBps=achieved / 1e9,
                                roof_GBps=roof / 1e9, roof_ratio=achieved / roof, **extra)
