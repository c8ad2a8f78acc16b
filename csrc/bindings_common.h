// What both pybind11 modules share: the dtype constants they export and the argument
// checks they make before a kernel runs. The Python side (ncl_kernels/_validate.py) checks
// that pointers, shapes and dtypes match real tensors; here we only refuse what would
// certainly crash.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>

#include "common/ncl_math.h"

namespace ncl {
namespace bindings {

namespace py = pybind11;

inline void add_dtype_codes(py::module_& mod) {
  mod.attr("DTYPE_F32") = int(F32);
  mod.attr("DTYPE_F64") = int(F64);
  mod.attr("DTYPE_F16") = int(F16);
  mod.attr("DTYPE_BF16") = int(BF16);
}

inline void check_dtype(int dtype) {
  if (dtype < F32 || dtype > BF16)
    throw py::value_error("unknown dtype code " + std::to_string(dtype) +
                          " (expected DTYPE_F32=0, DTYPE_F64=1, DTYPE_F16=2, DTYPE_BF16=3)");
}

// An n x m block of scores at s_ptr with the given row stride, reduced into out_ptr (n).
inline void check_row_block(int64_t n, int64_t m, int64_t row_stride, uintptr_t s_ptr,
                            uintptr_t out_ptr) {
  if (n < 0 || m < 0)
    throw py::value_error("negative shape: n=" + std::to_string(n) + ", m=" + std::to_string(m));
  if (row_stride < m)
    throw py::value_error("row_stride=" + std::to_string(row_stride) + " < m=" + std::to_string(m));
  if (n > 0 && m > 0 && s_ptr == 0) throw py::value_error("null scores pointer");
  if (n > 0 && out_ptr == 0) throw py::value_error("null output pointer");
}

// An n x m block of scores at s_ptr with the given row stride (no output checked).
inline void check_block(int64_t n, int64_t m, int64_t row_stride, uintptr_t s_ptr) {
  if (n < 0 || m < 0)
    throw py::value_error("negative shape: n=" + std::to_string(n) + ", m=" + std::to_string(m));
  if (row_stride < m)
    throw py::value_error("row_stride=" + std::to_string(row_stride) + " < m=" + std::to_string(m));
  if (n > 0 && m > 0 && s_ptr == 0) throw py::value_error("null scores pointer");
}

// A vector argument of `count` elements that the kernel will read or write.
inline void check_vector(const char* what, uintptr_t ptr, int64_t count) {
  if (count > 0 && ptr == 0) throw py::value_error(std::string("null ") + what + " pointer");
}

// The pointers and strides of a gradient pass (both modules take the same arguments).
inline void check_grad(int64_t n, int64_t m, int64_t row_stride, int dtype, uintptr_t s_ptr,
                       uintptr_t f_ptr, uintptr_t g_ptr, uintptr_t lse_row_ptr,
                       uintptr_t lse_col_ptr, uintptr_t coef_row_ptr, uintptr_t coef_col_ptr,
                       uintptr_t y_ptr, uintptr_t z_ptr, uintptr_t out_ptr,
                       int64_t out_row_stride, uintptr_t ds_ptr) {
  check_dtype(dtype);
  check_block(n, m, row_stride, s_ptr);
  const std::pair<const char*, uintptr_t> rows[] = {
      {"f", f_ptr}, {"lse_row", lse_row_ptr}, {"coef_row", coef_row_ptr}, {"y", y_ptr}};
  const std::pair<const char*, uintptr_t> cols[] = {
      {"g", g_ptr}, {"lse_col", lse_col_ptr}, {"coef_col", coef_col_ptr}, {"z", z_ptr}};
  for (const auto& [what, ptr] : rows) check_vector(what, ptr, n > 0 && m > 0 ? n : 0);
  for (const auto& [what, ptr] : cols) check_vector(what, ptr, n > 0 && m > 0 ? m : 0);
  check_vector("ds", ds_ptr, 1);
  if (out_ptr != 0 && n > 1 && out_row_stride < m)
    throw py::value_error("out_row_stride=" + std::to_string(out_row_stride) + " < m=" +
                          std::to_string(m));
}

// The keyword names every primitive takes in both modules (module-specific ones follow:
// n_threads on the CPU, stream and work buffers on the GPU). One list, so the two modules
// cannot drift apart.
#define NCL_BLOCK_KWARGS \
  py::arg("s_ptr"), py::arg("n"), py::arg("m"), py::arg("row_stride"), py::arg("dtype"), \
      py::arg("scale")
#define NCL_GRAD_KWARGS                                                                        \
  NCL_BLOCK_KWARGS, py::arg("f_ptr"), py::arg("g_ptr"), py::arg("lse_row_ptr"),               \
      py::arg("lse_col_ptr"), py::arg("coef_row_ptr"), py::arg("coef_col_ptr"),               \
      py::arg("y_ptr"), py::arg("z_ptr"), py::arg("ds_ptr"), py::arg("row_offset") = 0,      \
      py::arg("out_ptr") = 0, py::arg("out_row_stride") = 0

}  // namespace bindings
}  // namespace ncl
