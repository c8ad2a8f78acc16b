"""The compiled CPU module through its raw-pointer binding: errors and determinism."""

import pytest
import torch

import ncl_kernels as nk

from conftest import random_scores

if not nk.backends()["cpu"]["usable"]:
    pytest.skip("the C++ CPU module is not built", allow_module_level=True)

from ncl_kernels import _C_cpu
from ncl_kernels.backends.cpu import CpuBackend


def block(S, **over):
    """The keyword arguments every primitive starts with (the same in _C_cuda)."""
    n, m = S.shape
    return {"s_ptr": S.data_ptr(), "n": n, "m": m, "row_stride": m, "dtype": 0, "scale": 1.0,
            **over}


def test_build_info_and_dtype_codes():
    info = _C_cpu.build_info()
    assert {"version", "compiler", "openmp"} <= set(info)
    assert (_C_cpu.DTYPE_F32, _C_cpu.DTYPE_F64, _C_cpu.DTYPE_F16, _C_cpu.DTYPE_BF16) == (0, 1, 2, 3)


def test_binding_refuses_bad_arguments():
    S = torch.zeros(3, 4)
    out = torch.empty(3)
    with pytest.raises(ValueError, match="dtype"):
        _C_cpu.row_lse(**block(S, dtype=9), out_ptr=out.data_ptr())
    with pytest.raises(ValueError, match="row_stride"):
        _C_cpu.row_lse(**block(S, row_stride=2), out_ptr=out.data_ptr())
    with pytest.raises(TypeError):  # keyword arguments only, as in _C_cuda
        _C_cpu.row_lse(S.data_ptr(), 3, 4, 4, 0, 1.0, 0, out.data_ptr(), 1)


def test_new_bindings_refuse_bad_arguments():
    S = torch.zeros(3, 4)
    v3, v4 = torch.zeros(3), torch.zeros(4)
    y = torch.zeros(3, dtype=torch.int64)
    z = torch.zeros(4, dtype=torch.int64)
    ds = torch.full((), 7.0)
    with pytest.raises(ValueError, match="row_stride"):
        _C_cpu.col_lse(**block(S, row_stride=3), out_ptr=v4.data_ptr())
    with pytest.raises(ValueError, match="null output"):
        _C_cpu.col_lse(**block(S), out_ptr=0)
    with pytest.raises(ValueError, match="dtype"):
        _C_cpu.apply_biases(**block(S, dtype=7))
    with pytest.raises(ValueError, match="negative shape"):
        _C_cpu.apply_biases(**block(S, n=-1))
    names = ["f", "g", "lse_row", "lse_col", "coef_row", "coef_col", "y", "z", "ds"]
    ptrs = dict(zip([k + "_ptr" for k in names],
                    [v3.data_ptr(), v4.data_ptr(), v3.data_ptr(), v4.data_ptr(), v3.data_ptr(),
                     v4.data_ptr(), y.data_ptr(), z.data_ptr(), ds.data_ptr()]))
    for what in names:
        with pytest.raises(ValueError, match=f"null {what} pointer"):
            _C_cpu.ncl_grad(**block(S), **dict(ptrs, **{what + "_ptr": 0}))
    with pytest.raises(ValueError, match="out_row_stride"):
        _C_cpu.ncl_grad(**block(S), **ptrs, out_ptr=S.data_ptr(), out_row_stride=2)
    for what in ["g", "log_r", "f", "lse_row", "col_max"]:
        step = {"g_ptr": v4.data_ptr(), "log_r_ptr": v3.data_ptr(), "f_ptr": v3.data_ptr(),
                "lse_row_ptr": v3.data_ptr(), "col_max_ptr": v4.data_ptr()}
        with pytest.raises(ValueError, match=f"null {what} pointer"):
            _C_cpu.sinkhorn_step(**block(S), **dict(step, **{what + "_ptr": 0}))
    # the valid call works and writes dscale (0 for S = 0) as one accumulator value
    assert _C_cpu.ncl_grad(**block(S), **ptrs) is None
    assert float(ds) == 0.0


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
