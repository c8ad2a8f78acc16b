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

void row_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t g_ptr, uintptr_t out_ptr, uintptr_t stream) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_row_block(n, m, row_stride, s_ptr, out_ptr);
  cudaError_t e;
  {
    py::gil_scoped_release no_gil;  // a launch can block when the stream's queue is full
    e = ncl::cuda::row_lse_cuda(reinterpret_cast<const void*>(s_ptr), n, m, row_stride, dtype,
                                static_cast<float>(scale), reinterpret_cast<const void*>(g_ptr),
                                reinterpret_cast<void*>(out_ptr),
                                reinterpret_cast<cudaStream_t>(stream));
  }
  check(e, "row_lse_cuda");  // raised (RuntimeError) with the GIL held
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

  mod.def("row_lse", &row_lse, py::arg("s_ptr"), py::arg("n"), py::arg("m"),
          py::arg("row_stride"), py::arg("dtype"), py::arg("scale"), py::arg("g_ptr"),
          py::arg("out_ptr"), py::arg("stream"),
          R"doc(out[i] = log sum_j exp(scale * S[i, j] + g[j]) on the GPU (device pointers).

Same arguments as _C_cpu.row_lse, but `stream` (a cudaStream_t as int, e.g.
torch.cuda.current_stream().cuda_stream; 0 = default stream) instead of n_threads.
`scale` is rounded to float32. Enqueues asynchronously; raises RuntimeError if the
launch fails (no device, bad configuration). Releases the GIL.)doc");

  mod.def("device_count", &device_count,
          "number of CUDA devices visible to this module; 0 (never an error) without GPU/driver");
  mod.def("build_info", &build_info,
          "dict: version, cuda_version (compiled with), architectures, cudart, driver_version");
}
