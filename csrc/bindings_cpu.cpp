// pybind11 module ncl_kernels._C_cpu — the CPU primitives.
//
// No torch headers: tensors cross the boundary as raw pointers (tensor.data_ptr(), a
// Python int) plus shape, row stride (in elements) and a dtype code. The build therefore
// needs no torch and one built module survives torch upgrades. Checking that pointers,
// shapes and dtypes actually match the tensors is the Python side's job
// (ncl_kernels/_validate.py); bindings_common.h refuses what would certainly crash.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings_common.h"
#include "cpu/primitives.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#ifndef NCL_VERSION
#define NCL_VERSION "unknown"
#endif
#ifndef NCL_COMPILER
#define NCL_COMPILER "unknown"
#endif

namespace {

void row_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t g_ptr, uintptr_t out_ptr, int n_threads) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_row_block(n, m, row_stride, s_ptr, out_ptr);
  py::gil_scoped_release no_gil;
  ncl::cpu::row_lse(reinterpret_cast<const void*>(s_ptr), n, m, row_stride, dtype, scale,
                    reinterpret_cast<const void*>(g_ptr), reinterpret_cast<void*>(out_ptr),
                    n_threads);
}

py::dict build_info() {
  py::dict d;
  d["version"] = NCL_VERSION;
  d["compiler"] = NCL_COMPILER;
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = _OPENMP;  // yyyymm of the spec the compiler implements
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_version"] = 0;
  d["openmp_max_threads"] = 1;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, mod) {
  mod.doc() = "ncl_kernels CPU primitives (raw-pointer interface; see ncl_kernels.backends.cpu)";

  ncl::bindings::add_dtype_codes(mod);

  mod.def("row_lse", &row_lse, py::arg("s_ptr"), py::arg("n"), py::arg("m"),
          py::arg("row_stride"), py::arg("dtype"), py::arg("scale"), py::arg("g_ptr"),
          py::arg("out_ptr"), py::arg("n_threads"),
          R"doc(out[i] = log sum_j exp(scale * S[i, j] + g[j]) for an n x m block of scores.

S: pointer to storage of `dtype` (DTYPE_F32/F64/F16/BF16), column stride 1, row stride
`row_stride` elements (>= m). g_ptr: m float values (double for F64), or 0 for g = 0.
out_ptr: n float values (double for F64). Logits are formed and accumulated in float
(double for F64). -inf entries are masks; an all -inf row gives -inf.
n_threads <= 0 uses the OpenMP default. Releases the GIL.)doc");

  mod.def("build_info", &build_info,
          "dict: version, compiler, openmp (bool), openmp_version, openmp_max_threads");
}
