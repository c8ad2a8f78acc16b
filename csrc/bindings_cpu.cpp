// pybind11 module ncl_kernels._C_cpu — the CPU primitives.
//
// No torch headers: tensors cross the boundary as raw pointers (tensor.data_ptr(), a
// Python int) plus shape, row stride (in elements) and a dtype code. The build therefore
// needs no torch and one built module survives torch upgrades. Checking that pointers,
// shapes and dtypes actually match the tensors is the Python side's job
// (ncl_kernels/_validate.py); bindings_common.h refuses what would certainly crash.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

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

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void row_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t g_ptr, uintptr_t out_ptr, int n_threads, uintptr_t sum_ptr) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_row_block(n, m, row_stride, s_ptr, out_ptr);
  py::gil_scoped_release no_gil;
  ncl::cpu::row_lse(cptr<void>(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(g_ptr),
                    mptr(out_ptr), mptr(sum_ptr), n_threads);
}

void col_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t f_ptr, uintptr_t out_ptr, int n_threads, uintptr_t sum_ptr) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_block(n, m, row_stride, s_ptr);
  ncl::bindings::check_vector("output", out_ptr, m);
  py::gil_scoped_release no_gil;
  ncl::cpu::col_lse(cptr<void>(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(f_ptr),
                    mptr(out_ptr), mptr(sum_ptr), n_threads);
}

double ncl_grad(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype,
                double scale, uintptr_t f_ptr, uintptr_t g_ptr, uintptr_t lse_row_ptr,
                uintptr_t lse_col_ptr, uintptr_t coef_row_ptr, uintptr_t coef_col_ptr,
                uintptr_t y_ptr, uintptr_t z_ptr, int64_t row_offset, uintptr_t out_ptr,
                int64_t out_row_stride, int n_threads) {
  namespace b = ncl::bindings;
  b::check_dtype(dtype);
  b::check_block(n, m, row_stride, s_ptr);
  for (auto [what, ptr] : {std::pair<const char*, uintptr_t>{"f", f_ptr}, {"lse_row", lse_row_ptr},
                           {"coef_row", coef_row_ptr}, {"y", y_ptr}})
    b::check_vector(what, ptr, n);
  for (auto [what, ptr] : {std::pair<const char*, uintptr_t>{"g", g_ptr}, {"lse_col", lse_col_ptr},
                           {"coef_col", coef_col_ptr}, {"z", z_ptr}})
    b::check_vector(what, ptr, m);
  if (out_ptr != 0 && out_row_stride < m)
    throw py::value_error("out_row_stride=" + std::to_string(out_row_stride) + " < m=" +
                          std::to_string(m));
  py::gil_scoped_release no_gil;
  return ncl::cpu::ncl_grad(cptr<void>(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(f_ptr),
                            cptr<void>(g_ptr), cptr<void>(lse_row_ptr), cptr<void>(lse_col_ptr),
                            cptr<void>(coef_row_ptr), cptr<void>(coef_col_ptr),
                            cptr<int64_t>(y_ptr), cptr<int64_t>(z_ptr), row_offset,
                            mptr(out_ptr), out_row_stride, n_threads);
}

void apply_biases(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype,
                  double scale, uintptr_t f_ptr, uintptr_t g_ptr, int n_threads) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_block(n, m, row_stride, s_ptr);
  py::gil_scoped_release no_gil;
  ncl::cpu::apply_biases(mptr(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(f_ptr),
                         cptr<void>(g_ptr), n_threads);
}

void set_isa(const std::string& name) {
  try {
    ncl::cpu::set_isa(name);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
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
  d["isa"] = ncl::cpu::isa();
  d["available_isas"] = ncl::cpu::available_isas();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, mod) {
  mod.doc() = "ncl_kernels CPU primitives (raw-pointer interface; see ncl_kernels.backends.cpu)";

  ncl::bindings::add_dtype_codes(mod);

  mod.def("row_lse", &row_lse, py::arg("s_ptr"), py::arg("n"), py::arg("m"),
          py::arg("row_stride"), py::arg("dtype"), py::arg("scale"), py::arg("g_ptr"),
          py::arg("out_ptr"), py::arg("n_threads"), py::arg("sum_ptr") = 0,
          R"doc(out[i] = log sum_j exp(scale * S[i, j] + g[j]) for an n x m block of scores.

S: pointer to storage of `dtype` (DTYPE_F32/F64/F16/BF16), column stride 1, row stride
`row_stride` elements (>= m). g_ptr: m float values (double for F64), or 0 for g = 0.
out_ptr: n float values (double for F64). Logits are formed and accumulated in float
(double for F64). -inf entries are masks; an all -inf row gives -inf.
n_threads <= 0 uses the OpenMP default. With sum_ptr != 0 (n more values) the LSE comes
back unfinished: out = max logit, sum = sum exp(logit - max), LSE = out + log(sum).
Releases the GIL.)doc");

  mod.def("col_lse", &col_lse, py::arg("s_ptr"), py::arg("n"), py::arg("m"),
          py::arg("row_stride"), py::arg("dtype"), py::arg("scale"), py::arg("f_ptr"),
          py::arg("out_ptr"), py::arg("n_threads"), py::arg("sum_ptr") = 0,
          R"doc(out[j] = log sum_i exp(scale * S[i, j] + f[i]); arguments as in row_lse, with
f_ptr: n values (or 0 for f = 0), out_ptr (and sum_ptr): m values. S is streamed
row-major.)doc");

  mod.def("ncl_grad", &ncl_grad, py::arg("s_ptr"), py::arg("n"), py::arg("m"),
          py::arg("row_stride"), py::arg("dtype"), py::arg("scale"), py::arg("f_ptr"),
          py::arg("g_ptr"), py::arg("lse_row_ptr"), py::arg("lse_col_ptr"),
          py::arg("coef_row_ptr"), py::arg("coef_col_ptr"), py::arg("y_ptr"), py::arg("z_ptr"),
          py::arg("row_offset"), py::arg("out_ptr"), py::arg("out_row_stride"),
          py::arg("n_threads"),
          R"doc(The NCL gradient pass over an n x m block of scores (SPEC.md section 3).

Returns sum_ij G_ij S_ij (a float, over unmasked S) and, when out_ptr != 0, writes
scale * G in `dtype` at out_ptr (row stride out_row_stride; out_ptr == s_ptr is in place).
f, lse_row, coef_row: n accumulator values; g, lse_col, coef_col: m; y: n int64 target
columns, z: m int64 target rows (global: row_offset is the index of the block's first row),
-1 for none. Releases the GIL.)doc");

  mod.def("apply_biases", &apply_biases, py::arg("s_ptr"), py::arg("n"), py::arg("m"),
          py::arg("row_stride"), py::arg("dtype"), py::arg("scale"), py::arg("f_ptr"),
          py::arg("g_ptr"), py::arg("n_threads"),
          R"doc(In place S <- scale * S + f[i] + g[j] (f_ptr/g_ptr 0: zero), computed in the
accumulator type and rounded once to `dtype`. Releases the GIL.)doc");

  mod.def("isa", &ncl::cpu::isa, "the instruction set whose kernels run: avx512, avx2, generic");
  mod.def("available_isas", &ncl::cpu::available_isas,
          "comma-separated instruction sets this build has and this CPU runs, best first");
  mod.def("set_isa", &set_isa, py::arg("name"),
          "use the kernels of the named instruction set from now on (process-wide)");

  mod.def("build_info", &build_info,
          "dict: version, compiler, openmp (bool), openmp_version, openmp_max_threads, isa, "
          "available_isas");
}
