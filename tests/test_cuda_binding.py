"""The CUDA module's host side, which runs without a GPU: argument checks (raised before
any launch), launch errors surfacing as Python exceptions, and the launch-shape policies
(slab and block counts) that size the work buffers. The kernels themselves are checked in
test_gpu.py on a GPU."""

import pytest

import ncl_kernels as nk

if not nk.backends()["cuda"]["built"]:
    pytest.skip("the CUDA module is not built", allow_module_level=True)

from ncl_kernels import _C_cuda as C

F32, F64, F16, BF16 = C.DTYPE_F32, C.DTYPE_F64, C.DTYPE_F16, C.DTYPE_BF16
FAKE = 1 << 20  # a non-null "device pointer"; never dereferenced by these tests


def block(**over):
    """The keyword arguments every primitive starts with (the same in _C_cpu)."""
    return {"s_ptr": FAKE, "n": 3, "m": 4, "row_stride": 4, "dtype": F32, "scale": 1.0, **over}


def test_build_info():
    info = C.build_info()
    assert info["cudart"] == "static"
    assert info["architectures"] != "unknown"
    assert (F32, F64, F16, BF16) == (0, 1, 2, 3)


@pytest.mark.parametrize("call", [
    lambda: C.row_lse(**block(dtype=9), out_ptr=FAKE),
    lambda: C.col_lse(**block(dtype=7), out_ptr=FAKE),
    lambda: C.apply_biases(**block(dtype=-1)),
    lambda: C.col_lse_slabs(3, 4, 5, 132),
])
def test_unknown_dtype_is_a_value_error(call):
    with pytest.raises(ValueError, match="dtype"):
        call()


def grad_args(**over):
    args = {**block(), "f_ptr": FAKE, "g_ptr": FAKE, "lse_row_ptr": FAKE, "lse_col_ptr": FAKE,
            "coef_row_ptr": FAKE, "coef_col_ptr": FAKE, "y_ptr": FAKE, "z_ptr": FAKE,
            "row_offset": 0, "out_ptr": 0, "out_row_stride": 0, "ds_ptr": FAKE,
            "work_ptr": FAKE, "work_capacity": C.ncl_grad_blocks(3, 4), "stream": 0}
    args.update(over)
    return args


@pytest.mark.parametrize("call, match", [
    (lambda: C.row_lse(**block(row_stride=2), out_ptr=FAKE), "row_stride"),
    (lambda: C.row_lse(**block(s_ptr=0), out_ptr=FAKE), "null scores"),
    (lambda: C.row_lse(**block(), out_ptr=0), "null output"),
    (lambda: C.row_lse(**block(n=-1), out_ptr=FAKE), "negative"),
    (lambda: C.col_lse(**block(), out_ptr=0), "out"),
    (lambda: C.col_lse(**block(), out_ptr=FAKE, n_slabs=0), "n_slabs"),
    (lambda: C.col_lse(**block(), out_ptr=FAKE, n_slabs=2), "work"),
    (lambda: C.ncl_grad(**grad_args(g_ptr=0)), "g"),
    (lambda: C.ncl_grad(**grad_args(z_ptr=0)), "z"),
    (lambda: C.ncl_grad(**grad_args(ds_ptr=0)), "ds"),
    (lambda: C.ncl_grad(**grad_args(work_capacity=0)), "work_capacity"),
    (lambda: C.ncl_grad(**grad_args(out_ptr=FAKE, out_row_stride=3)), "out_row_stride"),
    (lambda: C.apply_biases(**block(row_stride=1)), "row_stride"),
    (lambda: C.row_lse(**block(), out_ptr=FAKE, sum_ptr=FAKE), "sum_ptr"),
])
def test_bad_arguments_are_value_errors_before_any_launch(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(C.device_count() > 0, reason="checks the no-device error path")
@pytest.mark.parametrize("name, call", [
    ("row_lse_cuda", lambda: C.row_lse(**block(), out_ptr=FAKE)),
    ("col_lse_cuda", lambda: C.col_lse(**block(dtype=BF16), out_ptr=FAKE)),
    ("ncl_grad_cuda", lambda: C.ncl_grad(**grad_args())),
    ("apply_biases_cuda", lambda: C.apply_biases(**block(dtype=F16))),
])
def test_launch_without_a_device_raises_runtime_error(name, call):
    with pytest.raises(RuntimeError, match=name):
        call()


def test_empty_blocks_launch_nothing():
    # nothing to reduce or write: no launch, so no error even without a device
    C.row_lse(**block(s_ptr=0, n=0), out_ptr=0)
    C.col_lse(**block(s_ptr=0, m=0, row_stride=0), out_ptr=0)
    C.apply_biases(**block(s_ptr=0, n=0))


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16])
@pytest.mark.parametrize("n, m", [(1, 1), (7, 1031), (1031, 7), (32768, 32768),
                                  (1 << 24, 3), (3, 1 << 24), (1 << 40, 1)])
def test_col_lse_slab_policy(dtype, n, m):
    slabs = C.col_lse_slabs(n, m, dtype, 132)
    assert 1 <= slabs <= 65535  # gridDim.y
    assert slabs <= max(1, -(-n // 64))  # at least 64 rows per slab
    if m >= 1 << 24:
        assert slabs == 1  # enough column tiles to fill the GPU: one pass, no workspace
    # the workspace (2 * slabs * m accumulators) stays small: slabs > 1 only when there
    # are fewer column tiles (of <= 256 columns) than target blocks (132 SMs x 8)
    assert slabs == 1 or slabs * m <= 2 * 132 * 8 * 256


@pytest.mark.parametrize("n, m", [(1, 1), (7, 4096), (1 << 40, 5), (5, 1 << 40)])
def test_ncl_grad_block_policy(n, m):
    assert 1 <= C.ncl_grad_blocks(n, m) <= 2048
