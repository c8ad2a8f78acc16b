"""The CPU kernels' vectorized exp (csrc/cpu/simd.h) against a correctly rounded reference.

Every instruction set this build has and this CPU runs is checked on its own (through
``_C_cpu.exp_f32(..., isa)``), over a dense stride through all 2^32 bit patterns and
exhaustively over the bands where an exp goes wrong first: subnormal results, overflow,
and arguments near 0. The reference is float64 exp rounded once to float32; the bound is
2 ulp (the reference itself may be 1 ulp off the true rounding in rare double-rounding
cases). ``NCL_EXP_EXHAUSTIVE=1`` checks every float32 in [-104, 89] instead (minutes).
"""

import os

import pytest
import torch

import ncl_kernels as nk

if not nk.backends()["cpu"]["usable"]:
    pytest.skip("the C++ CPU module is not built", allow_module_level=True)

from ncl_kernels import _C_cpu

ISAS = _C_cpu.available_isas().split(",")
CHUNK = 1 << 24


def ours(x: torch.Tensor, isa: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _C_cpu.exp_f32(x.data_ptr(), out.data_ptr(), x.numel(), isa)
    return out


def floats(lo_bits: int, hi_bits: int, step: int = 1) -> torch.Tensor:
    """float32 values of the bit patterns lo_bits, lo_bits + step, ... < hi_bits."""
    bits = torch.arange(lo_bits, hi_bits, step, dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)  # wraps patterns >= 2^31: negatives


def bits_of(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32)[0]) & 0xFFFFFFFF


def check(x: torch.Tensor, isa: str, what: str) -> None:
    got = ours(x, isa)
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all(), f"{isa} {what}: NaN must stay NaN"
    x, got = x[~nan], got[~nan]
    want = x.double().exp().float()  # correctly rounded but for rare double roundings
    assert not torch.isnan(got).any(), f"{isa} {what}: NaN for a number"
    # exp >= 0: the distance of the bit patterns is the distance in ulps, subnormals included
    # (inf is the pattern after the largest float, so a finite result for an overflow is 1+)
    dist = (got.view(torch.int32).to(torch.int64) - want.view(torch.int32).to(torch.int64)).abs()
    worst = int(dist.argmax())
    assert int(dist[worst]) <= 2, (f"{isa} {what}: exp({float(x[worst])!r}) = "
                                   f"{float(got[worst])!r}, correctly rounded "
                                   f"{float(want[worst])!r}: {int(dist[worst])} ulp")


@pytest.mark.parametrize("isa", ISAS)
def test_exp_special_values(isa):
    x = torch.tensor([float("-inf"), float("inf"), float("nan"), 0.0, -0.0, 1.0, -1.0,
                      88.72283172607422, 88.72283935546875, 89.0, 1e30, -1e30, -103.9,
                      -103.97, -104.0, -87.33654022216797, -87.4, 1e-45, -1e-45])
    got = ours(x, isa)
    assert got[0] == 0.0 and not torch.signbit(got[0])
    assert got[1] == float("inf") and torch.isnan(got[2])
    assert got[3] == 1.0 and got[4] == 1.0
    assert got[7] < float("inf") and got[8] == float("inf") and got[9] == float("inf")
    assert got[10] == float("inf") and got[11] == 0.0 and got[14] == 0.0
    assert got[12] > 0.0  # a subnormal result, not flushed
    assert got[17] == 1.0 and got[18] == 1.0
    check(x, isa, "special values")


@pytest.mark.parametrize("isa", ISAS)
def test_exp_dense_stride_through_all_bit_patterns(isa):
    # every 509th of the 2^32 patterns (8.4 million inputs: all signs, exponents, NaNs)
    for start in range(0, 1 << 32, CHUNK * 509):
        check(floats(start, min(1 << 32, start + CHUNK * 509), 509), isa, "stride 509")


@pytest.mark.parametrize("isa", ISAS)
def test_exp_exhaustive_where_it_is_hardest(isa):
    bands = {
        # results below the normal range (subnormal, rounded once) down to 0: all of
        # [-104, -87], 2.2 million floats
        "subnormal results": (bits_of(-87.0), bits_of(-104.0) + 1),
        # the last normal results and overflow to inf
        "overflow": (bits_of(88.0), bits_of(89.0) + 1),
        # [-1, -0.5] and [0.5, 1]: the polynomial's whole range at full resolution
        "[-1, -0.5]": (bits_of(-0.5), bits_of(-1.0) + 1),
        "[0.5, 1]": (bits_of(0.5), bits_of(1.0) + 1),
        # small arguments, where exp(x) rounds to 1 + x or its neighbours
        "[2^-25, 2^-24)": (bits_of(2.0 ** -25), bits_of(2.0 ** -24)),
        "(-2^-24, -2^-25]": (bits_of(-(2.0 ** -25)), bits_of(-(2.0 ** -24))),
    }
    for what, (lo, hi) in bands.items():
        for start in range(lo, hi, CHUNK):
            check(floats(start, min(hi, start + CHUNK)), isa, what)


@pytest.mark.skipif(os.environ.get("NCL_EXP_EXHAUSTIVE") != "1",
                    reason="every float32 in [-104, 89]: set NCL_EXP_EXHAUSTIVE=1 (minutes)")
@pytest.mark.parametrize("isa", ISAS)
def test_exp_every_float_in_range(isa):
    for lo, hi in [(0, bits_of(89.0) + 1), (0x80000000, bits_of(-104.0) + 1)]:
        for start in range(lo, hi, CHUNK):
            check(floats(start, min(hi, start + CHUNK)), isa, "exhaustive")


def test_exp_entry_refuses_unknown_or_missing_sets():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="unknown instruction set"):
        _C_cpu.exp_f32(x.data_ptr(), x.data_ptr(), 4, "sse9")
    missing = {"avx512", "avx2", "generic"} - set(ISAS)
    for name in missing:
        with pytest.raises(ValueError, match="not available"):
            _C_cpu.exp_f32(x.data_ptr(), x.data_ptr(), 4, name)
    # "" is the set in use; odd lengths take the tail path
    y = torch.linspace(-3, 3, 37)
    torch.testing.assert_close(ours(y, ""), y.exp(), rtol=3e-7, atol=0)
