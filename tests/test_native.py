"""The compiled CPU module through its raw-pointer binding: errors and determinism."""

import pytest
import torch

import ncl_kernels as nk

from conftest import random_scores

if not nk.backends()["cpu"]["usable"]:
    pytest.skip("the C++ CPU module is not built", allow_module_level=True)

from ncl_kernels import _C_cpu
from ncl_kernels.backends.cpu import CpuBackend


def test_build_info_and_dtype_codes():
    info = _C_cpu.build_info()
    assert {"version", "compiler", "openmp"} <= set(info)
    assert (_C_cpu.DTYPE_F32, _C_cpu.DTYPE_F64, _C_cpu.DTYPE_F16, _C_cpu.DTYPE_BF16) == (0, 1, 2, 3)


def test_binding_refuses_bad_arguments():
    S = torch.zeros(3, 4)
    out = torch.empty(3)
    with pytest.raises(ValueError, match="dtype"):
        _C_cpu.row_lse(S.data_ptr(), 3, 4, 4, 9, 1.0, 0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="row_stride"):
        _C_cpu.row_lse(S.data_ptr(), 3, 4, 2, 0, 1.0, 0, out.data_ptr(), 1)


def test_new_bindings_refuse_bad_arguments():
    S = torch.zeros(3, 4)
    v3, v4 = torch.zeros(3), torch.zeros(4)
    y = torch.zeros(3, dtype=torch.int64)
    z = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="row_stride"):
        _C_cpu.col_lse(S.data_ptr(), 3, 4, 3, 0, 1.0, 0, v4.data_ptr(), 1)
    with pytest.raises(ValueError, match="null output"):
        _C_cpu.col_lse(S.data_ptr(), 3, 4, 4, 0, 1.0, 0, 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        _C_cpu.apply_biases(S.data_ptr(), 3, 4, 4, 7, 1.0, 0, 0, 1)
    with pytest.raises(ValueError, match="negative shape"):
        _C_cpu.apply_biases(S.data_ptr(), -1, 4, 4, 0, 1.0, 0, 0, 1)
    ptrs = [v3.data_ptr(), v4.data_ptr(), v3.data_ptr(), v4.data_ptr(), v3.data_ptr(),
            v4.data_ptr(), y.data_ptr(), z.data_ptr()]
    for k, what in enumerate(["f", "g", "lse_row", "lse_col", "coef_row", "coef_col", "y", "z"]):
        bad = list(ptrs)
        bad[k] = 0
        with pytest.raises(ValueError, match=f"null {what} pointer"):
            _C_cpu.ncl_grad(S.data_ptr(), 3, 4, 4, 0, 1.0, *bad, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="out_row_stride"):
        _C_cpu.ncl_grad(S.data_ptr(), 3, 4, 4, 0, 1.0, *ptrs, 0, S.data_ptr(), 2, 1)
    # the valid call works and returns dscale as a float
    assert isinstance(_C_cpu.ncl_grad(S.data_ptr(), 3, 4, 4, 0, 1.0, *ptrs, 0, 0, 0, 1), float)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_row_lse_bitwise_equal_across_thread_counts(dtype):
    S = random_scores(301, 517, dtype, seed=5, strided=True, scale=3.0)
    S[7, 100:] = float("-inf")
    g = torch.randn(517, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    be = CpuBackend()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(be.row_lse(S, 4.0, g))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    expect = torch.logsumexp(4.0 * S.double() + g.double(), 1)
    torch.testing.assert_close(results[0].double(), expect, rtol=1e-6, atol=0)
