// pybind11 module ncl_kernels._C_cuda — the CUDA primitives.
//
// Compiled by the host C++ compiler against cuda_runtime_api.h only; the kernels live in
// csrc/cuda/*.cu. Like _C_cpu it takes raw device pointers and a stream handle (Python
// ints: tensor.data_ptr(), torch.cuda.current_stream().cuda_stream), so no torch headers.
//
// The CUDA runtime is linked statically, i.e. this module has its own runtime instance
// next to torch's. Streams and device pointers are driver-level objects of the shared
// primary context, so handing torch's over works; the *current device* is read from the
// calling thread's current context, so the caller must make the tensors' device current
// (torch.cuda.device(t.device)) before calling.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "bindings_common.h"
#include "cuda/primitives.cuh"

namespace py = pybind11;

#ifndef NCL_VERSION
#define NCL_VERSION "unknown"
#endif
#ifndef NCL_CUDA_ARCHS
#define NCL_CUDA_ARCHS "unknown"
#endif

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

// Runs a launcher without the GIL (a launch can block when the stream's queue is full),
// then raises its error, if any, as a RuntimeError with the GIL held.
template <typename Launch>
void launch_checked(const char* what, Launch&& launch) {
  cudaError_t e;
  {
    py::gil_scoped_release no_gil;
    e = launch();
  }
  check(e, what);
}

template <typename T = void>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T = void>
T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void require(uintptr_t p, const char* name) {
  if (p == 0) throw py::value_error(std::string("null ") + name + " pointer");
}

// The GPU kernels finish their LSEs on the device (CUDA's log is the log torch uses there),
// so the unfinished (max, sum) output of _C_cpu is not offered: sum_ptr must be 0.
void no_sum(uintptr_t sum_ptr) {
  if (sum_ptr != 0)
    throw py::value_error("sum_ptr: the CUDA kernels return finished LSEs (pass 0)");
}

void row_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t g_ptr, uintptr_t out_ptr, uintptr_t sum_ptr, uintptr_t stream) {
  no_sum(sum_ptr);
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_row_block(n, m, row_stride, s_ptr, out_ptr);
  launch_checked("row_lse_cuda", [&] {
    return ncl::cuda::row_lse_cuda(cptr(s_ptr), n, m, row_stride, dtype, scale, cptr(g_ptr),
                                   mptr(out_ptr), as_stream(stream));
  });
}

int64_t col_lse_slabs(int64_t n, int64_t m, int dtype, int sm_count) {
  ncl::bindings::check_dtype(dtype);
  return ncl::cuda::col_lse_slabs(n, m, dtype, sm_count);
}

void col_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t f_ptr, uintptr_t out_ptr, uintptr_t sum_ptr, uintptr_t stream,
             uintptr_t work_ptr, int64_t n_slabs) {
  no_sum(sum_ptr);
  ncl::bindings::check_dtype(dtype);
  // the block is n x m, reduced into m outputs
  ncl::bindings::check_row_block(n, m, row_stride, s_ptr, n > 0 ? 1 : 0);
  if (m > 0) require(out_ptr, "out");
  if (n_slabs < 1) throw py::value_error("n_slabs must be >= 1");
  if (n_slabs > 1 && m > 0) require(work_ptr, "work (needed when n_slabs > 1)");
  launch_checked("col_lse_cuda", [&] {
    return ncl::cuda::col_lse_cuda(cptr(s_ptr), n, m, row_stride, dtype, scale, cptr(f_ptr),
                                   mptr(out_ptr), mptr(work_ptr), n_slabs, as_stream(stream));
  });
}

void ncl_grad(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
              uintptr_t f_ptr, uintptr_t g_ptr, uintptr_t lse_row_ptr, uintptr_t lse_col_ptr,
              uintptr_t coef_row_ptr, uintptr_t coef_col_ptr, uintptr_t y_ptr, uintptr_t z_ptr,
              uintptr_t ds_ptr, int64_t row_offset, uintptr_t out_ptr, int64_t out_row_stride,
              uintptr_t stream, uintptr_t work_ptr, int64_t work_capacity) {
  ncl::bindings::check_grad(n, m, row_stride, dtype, s_ptr, f_ptr, g_ptr, lse_row_ptr,
                            lse_col_ptr, coef_row_ptr, coef_col_ptr, y_ptr, z_ptr, out_ptr,
                            out_row_stride, ds_ptr);
  require(work_ptr, "work");
  if (n > 0 && m > 0 && work_capacity < ncl::cuda::ncl_grad_blocks(n, m))
    throw py::value_error("work_capacity=" + std::to_string(work_capacity) +
                          " < ncl_grad_blocks(n, m)=" +
                          std::to_string(ncl::cuda::ncl_grad_blocks(n, m)));
  const ncl::cuda::GradPtrs p{cptr(s_ptr), mptr(out_ptr), cptr(f_ptr), cptr(g_ptr),
                              cptr(lse_row_ptr), cptr(lse_col_ptr), cptr(coef_row_ptr),
                              cptr(coef_col_ptr), cptr<int64_t>(y_ptr), cptr<int64_t>(z_ptr),
                              mptr(ds_ptr), mptr(work_ptr)};
  launch_checked("ncl_grad_cuda", [&] {
    return ncl::cuda::ncl_grad_cuda(p, n, m, row_stride, out_row_stride, dtype, scale,
                                    row_offset, work_capacity, as_stream(stream));
  });
}

void apply_biases(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype,
                  double scale, uintptr_t f_ptr, uintptr_t g_ptr, uintptr_t stream) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_row_block(n, m, row_stride, s_ptr, n > 0 ? 1 : 0);
  launch_checked("apply_biases_cuda", [&] {
    return ncl::cuda::apply_biases_cuda(mptr(s_ptr), n, m, row_stride, dtype, scale,
                                        cptr(f_ptr), cptr(g_ptr), as_stream(stream));
  });
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear it so later calls don't report it
    return 0;
  }
  return count;
}

std::string version_string(int v) {  // 13000 -> "13.0"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

py::dict build_info() {
  py::dict d;
  d["version"] = NCL_VERSION;
  d["cuda_version"] = version_string(CUDART_VERSION);  // toolkit this was compiled with
  d["architectures"] = NCL_CUDA_ARCHS;                 // CMAKE_CUDA_ARCHITECTURES
  d["cudart"] = "static";
  int drv = 0;
  if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;  // 0: no driver installed
  d["driver_version"] = drv ? version_string(drv) : std::string("none");
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, mod) {
  mod.doc() = "ncl_kernels CUDA primitives (raw-pointer interface; see ncl_kernels.backends.cuda)";

  ncl::bindings::add_dtype_codes(mod);

  // Every primitive takes keyword arguments only, with the names _C_cpu uses too
  // (bindings_common.h); then `stream` (a cudaStream_t as int, e.g.
  // torch.cuda.current_stream().cuda_stream; 0 = default stream) and the work buffers.
  mod.def("row_lse", &row_lse, py::kw_only(), NCL_BLOCK_KWARGS, py::arg("g_ptr") = 0,
          py::arg("out_ptr"), py::arg("sum_ptr") = 0, py::arg("stream") = 0,
          R"doc(out[i] = log sum_j exp(scale * S[i, j] + g[j]) on the GPU (device pointers).

The arguments of _C_cpu.row_lse, with `stream` instead of n_threads; sum_ptr must be 0
(the LSE is finished on the device). `scale` is rounded to the accumulator type (float;
double for DTYPE_F64). Enqueues asynchronously; raises RuntimeError if the launch fails.
Releases the GIL.)doc");

  mod.def("col_lse_slabs", &col_lse_slabs, py::arg("n"), py::arg("m"), py::arg("dtype"),
          py::arg("sm_count"),
          "number of row slabs col_lse should split an n x m block into on a GPU with "
          "sm_count multiprocessors (its work buffer then needs 2 * slabs * m values)");
  mod.def("col_lse", &col_lse, py::kw_only(), NCL_BLOCK_KWARGS, py::arg("f_ptr") = 0,
          py::arg("out_ptr"), py::arg("sum_ptr") = 0, py::arg("stream") = 0,
          py::arg("work_ptr") = 0, py::arg("n_slabs") = 1,
          R"doc(out[j] = log sum_i exp(scale * S[i, j] + f[i]) on the GPU (m outputs).

f_ptr: n accumulator values or 0 (f = 0). work_ptr: 2 * n_slabs * m accumulator values
when n_slabs > 1 (else may be 0); n_slabs from col_lse_slabs. Deterministic.)doc");

  mod.def("ncl_grad_blocks", &ncl::cuda::ncl_grad_blocks, py::arg("n"), py::arg("m"),
          "length of ncl_grad's work buffer (accumulator values) for an n x m block");
  mod.def("ncl_grad", &ncl_grad, py::kw_only(), NCL_GRAD_KWARGS, py::arg("stream") = 0,
          py::arg("work_ptr"), py::arg("work_capacity"),
          R"doc(The NCL gradient pass (Backend.ncl_grad_): out = scale * G, *ds = sum G * S.

The arguments of _C_cpu.ncl_grad (vectors f (n), g (m), lse_row (n), lse_col (m),
coef_row (n), coef_col (m) and the scalar ds are accumulator values; y (n) and z (m)
int64 targets; out_ptr: 0 (sum only), s_ptr (in place) or another block of S's dtype with
row stride out_row_stride), with `stream` and work: ncl_grad_blocks(n, m) accumulator
values. Deterministic (no atomics).)doc");

  mod.def("apply_biases", &apply_biases, py::kw_only(), NCL_BLOCK_KWARGS, py::arg("f_ptr") = 0,
          py::arg("g_ptr") = 0, py::arg("stream") = 0,
          "S <- scale * S + f[:, None] + g[None, :] in place (f_ptr/g_ptr 0: zero)");

  mod.def("device_count", &device_count,
          "number of CUDA devices visible to this module; 0 (never an error) without GPU/driver");
  mod.def("build_info", &build_info,
          "dict: version, cuda_version (compiled with), architectures, cudart, driver_version");
}
